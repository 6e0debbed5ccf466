"""What a 28×28 ε-network costs on this machine: parameters, XLA's FLOP count and the measured time of one
ε-loss gradient per frame, for the ``cpu-small`` MLP and U-Nets from the smallest useful one to the
``gpu`` preset's ``mnist28-unet``. It decides whether a conv network fits a 2-core CPU budget.

Each row: ``jax.grad`` of Σ ε_θ(z, t, k)² on a batch of ``--batch`` frames, jitted, compiled and called
once before the timed call (median of ``--repeats``). Not a test: ``.venv/bin/python benchmarks/conv_cost.py``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp

from hmdm_jax import models

SMALL_UNET = dict(kind="unet", channel_mults=(1, 2), num_res_blocks=1, attention_levels=(), mid_attention=False,
                  num_heads=1, class_heads="multi_head")
ROWS = {
    "cpu-small MLP (784 inputs)": (models.ModelConfig(kind="mlp", mlp_width=256, mlp_depth=3, mlp_residual=True,
                                                      mlp_layernorm=True, mlp_input_skip=True), (784,)),
    "U-Net width 16, 28→14, 1 res block": (models.ModelConfig(base_width=16, **SMALL_UNET), (28, 28, 1)),
    "U-Net width 32, 28→14, 1 res block": (models.ModelConfig(base_width=32, **SMALL_UNET), (28, 28, 1)),
    "mnist28-unet (the gpu preset)": (models.get_model_config("mnist28-unet"), (28, 28, 1)),
}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} CPUs; batch {args.batch}; "
          f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print("| network | parameters | gradient GFLOP / frame | gradient ms / frame | GFLOP/s |")
    print("|---|---:|---:|---:|---:|")
    for name, (cfg, shape) in ROWS.items():
        model = models.build_model(cfg, 10)
        params = models.init_params(jax.random.key(0), model, shape)
        eps_fn = models.make_eps_fn(model)
        z = jax.random.normal(jax.random.key(1), (args.batch, *shape))
        t = jnp.full((args.batch,), 500, jnp.int32)
        k = jnp.zeros((args.batch,), jnp.int32)
        grad = jax.jit(jax.grad(lambda p: jnp.sum(eps_fn(p, z, t, k) ** 2)))
        cost = grad.lower(params).compile().cost_analysis()
        flops = (cost[0] if isinstance(cost, list) else cost)["flops"] / args.batch
        jax.block_until_ready(grad(params))
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            jax.block_until_ready(grad(params))
            times.append((time.perf_counter() - start) / args.batch)
        seconds = statistics.median(times)
        print(f"| {name} | {models.param_count(params):,} | {flops / 1e9:.4f} | {1e3 * seconds:.2f} "
              f"| {flops / seconds / 1e9:.1f} |", flush=True)


if __name__ == "__main__":
    main()
