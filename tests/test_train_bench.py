"""``benchmarks/train_bench.py``: a row names its network and frame shape, and the script ends with the ratios
of its first row. Times are not asserted (benchmarks/README.md has them)."""
import re
import subprocess
import sys
from pathlib import Path

from hmdm_jax import models, run

ROOT = Path(__file__).resolve().parents[1]


def test_a_28x28_row_times_the_network_the_preset_ships_for_28x28_frames():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_bench.py"), "--rows",
                           "cpu-small@28x28x1:1x3:1:1"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    network = run.preset("cpu-small", "hmdm", 10, (28, 28, 1)).network
    assert network.mlp_width == 512 and network.mlp_input_skip
    params = models.param_count(models.param_shapes(models.build_model(network, 10), (28, 28, 1)))
    row = next(line for line in proc.stdout.splitlines() if line.startswith("| cpu-small@28x28x1 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "multi_head" and cells[2] == f"{params:,}" and cells[3] == "28x28x1" and cells[4] == "1x3 = 3"
    lines = proc.stdout.strip().splitlines()
    assert re.fullmatch(r"mixture_step/plain_step: \d+\.\d\d", lines[-2])
    assert re.fullmatch(r"hmdm_step/plain_step: \d+\.\d\d", lines[-1])
