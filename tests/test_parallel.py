"""4-device data parallelism equals one device on the same global batch (subprocess, 4 host devices)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("parallel_worker.py")


@pytest.fixture(scope="module")
def comparisons():
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4".strip()
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, str(WORKER), "mixture", "hmdm", "mixture-label-balanced"],
                          env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {r["model"]: r for r in map(json.loads, proc.stdout.strip().splitlines())}


@pytest.mark.parametrize("model_type", ["mixture", "hmdm", "mixture-label-balanced"])
def test_four_devices_equal_one_device(comparisons, model_type):
    r = comparisons[model_type]
    assert r["devices"] == 4
    assert r["loss_value"] > 0.1  # a real loss, not a degenerate batch
    assert r["loss"] < 1e-5
    assert r["grad_scale"] > 1e-4 and r["grads"] < 1e-5 * max(1.0, r["grad_scale"])
    assert r["ema"] < 1e-5
    # π/A statistics: the sampled classes are identical, so the summed counts agree exactly
    assert r["counts"] == 0.0 and r["usage"] < 1e-6 and r["priors"] < 1e-6
    assert r["total_count"] == (8 if model_type == "hmdm" else 16)  # mixture: frames; HMDM: initial states
    if model_type == "mixture-label-balanced":  # the capped label loss: each device scores its share's labelled frames
        assert r["label_loss"] > 0.1 and r["label_loss_diff"] < 1e-6
        # the balanced posterior: class totals over the global batch, not each device's share
        assert r["balanced_column_error"] < 0.5 and r["balanced_diff"] < 1e-4


@pytest.mark.parametrize("model_type", ["mixture", "hmdm"])
def test_indivisible_global_batch_is_a_clear_error(comparisons, model_type):
    assert "not divisible by the number of devices 4" in comparisons[model_type]["indivisible_error"]
