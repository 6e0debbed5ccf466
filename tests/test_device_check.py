"""``benchmarks/device_check.py --quick``: the prepared accelerator check runs end to end on the CPU and
reports what it promises (steps/s, accuracy, peak memory, the step ratios of both class-head settings)."""
import json
import math
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_device_check_quick_runs_and_reports_its_figures(tmp_path):
    workdir = tmp_path / "check"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "device_check.py"), "--quick",
                           "--workdir", str(workdir)], capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    match = re.fullmatch(r"hmdm_step/plain_step: (\d+\.\d\d)", last)
    assert match, last
    record = json.loads((workdir / "device_check.json").read_text())
    assert record["steps"] == 6 and (workdir / "checkpoints" / "6").is_dir()  # trained exactly the fixed steps
    assert math.isfinite(record["steps_per_second"]) and record["steps_per_second"] > 0
    assert 0.0 <= record["heldout_accuracy"] <= 1.0 and record["peak_memory_bytes"] > 2**20
    heads = [r["class_heads"] for r in record["step_ratios"]]
    assert heads == ["multi_head", "embedding"]  # the preset's own (multi-head) first, then the other
    for r in record["step_ratios"]:
        assert set(r["seconds"]) == {"hmdm step", "mixture step", "plain step"}
        assert all(v > 0 for v in r["seconds"].values())
        assert r["hmdm_step/plain_step"] == r["seconds"]["hmdm step"] / r["seconds"]["plain step"]
    assert float(match.group(1)) == round(record["step_ratios"][0]["hmdm_step/plain_step"], 2)
