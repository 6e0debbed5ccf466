"""Supervised diffusion-classifier accuracy of the embedding-conditioned and the multi-head ε-network.

A multi-head network (``ModelConfig.class_heads="multi_head"``) scores all K classes in one pass, but
its class can change ε only through the last layer. This script checks what that costs as a classifier:
for each form of the ``cpu-small`` preset's MLP, it trains a plain conditional DDPM with the true labels
(``mixture.make_supervised_step``, the preset's optimizer and EMA) on the sklearn 8×8 digits, then
classifies held-out digits by the argmax over k of ``emission.log_emission`` (``eps_mse``, its default
band) with the EMA parameters, at several numbers of t-draws. Both networks see the same training
batches, held-out split and scoring keys.

Not a test: ``.venv/bin/python benchmarks/heads_accuracy.py`` (``--steps``, ``--seeds``; ``--quick``
for a smoke run). Prints a Markdown table.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from hmdm_jax import emission, mixture, run
from hmdm_jax.data import load_source
from hmdm_jax.data.images import split_indices

HEADS = ("embedding", "multi_head")


def train(class_heads: str, images: np.ndarray, labels: np.ndarray, steps: int, batch: int, seed: int,
          mlp_width: int | None = None):
    """(config, parts, state, seconds, final loss) after ``steps`` supervised steps."""
    config = run.preset("cpu-small", "hmdm", 10, images.shape[1:])
    # "rankR": multi-head with a shared projection and rank-R class terms (ModelConfig.head_rank)
    network = (dataclasses.replace(config.network, class_heads="multi_head", head_rank=int(class_heads[4:]))
               if class_heads.startswith("rank") else dataclasses.replace(config.network, class_heads=class_heads))
    if mlp_width is not None:
        # the input skip follows the width as the preset sets it: on when the frame is wider than the MLP
        network = dataclasses.replace(network, mlp_width=mlp_width,
                                      mlp_input_skip=int(np.prod(images.shape[1:])) > mlp_width)
    config = dataclasses.replace(config, network=network, seed=seed)
    parts = run.build_parts(config)
    state = run.init_state(config, parts)
    step = jax.jit(mixture.make_supervised_step(parts.eps_fn, parts.schedule, parts.optimizer, num_classes=10,
                                                ema_decay=config.optim.ema_decay))
    rng = np.random.default_rng(seed)  # the same batches for both networks
    key = jax.random.key(seed)
    losses = []
    start = time.perf_counter()
    for i in range(steps):
        index = rng.choice(len(images), batch, replace=False)
        state, metrics = step(state, {"images": jnp.asarray(images[index]), "labels": jnp.asarray(labels[index])},
                              jax.random.fold_in(key, i))
        losses.append(metrics["loss"])
    jax.block_until_ready(state)
    return config, parts, state, time.perf_counter() - start, float(np.mean(jax.device_get(losses[-100:])))


def accuracy(parts, params, images, labels, num_t: int, seed: int, chunk: int = 500) -> float:
    """Held-out accuracy of argmax_k log b̃_k(y) (``eps_mse``, default band, ``num_t`` draws)."""
    score = jax.jit(lambda p, y, key: emission.log_emission(parts.eps_fn, p, parts.schedule, y, key, 10,
                                                            estimator="eps_mse", num_t=num_t))
    key = jax.random.key(1000 + seed)
    # in chunks: a 28×28 set's [K, num_t, N, D] noise predictions would not fit at once
    log_b = np.concatenate([np.asarray(score(params, jnp.asarray(images[i:i + chunk]), jax.random.fold_in(key, i)))
                            for i in range(0, len(images), chunk)])
    return float(np.mean(np.argmax(log_b, axis=-1) == labels))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--seeds", type=int, default=1, help="seeds 0..n-1 (split, init, batches, keys)")
    parser.add_argument("--num-t", default="1,4,16", help="comma-separated t-draws per held-out digit")
    parser.add_argument("--data", default="digits", help="SOURCE: digits | idx:DIR | npz:PATH (as experiments/)")
    parser.add_argument("--heads", default=",".join(HEADS),
                        help="comma-separated class-head forms: embedding, multi_head, rankR (multi-head, head_rank=R)")
    parser.add_argument("--mlp-width", type=int, default=None, help="override the preset's MLP width")
    parser.add_argument("--quick", action="store_true", help="smoke run: 20 steps, num_t 1")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.num_t = 20, "1"
    draws = [int(n) for n in args.num_t.split(",")]
    data = load_source(args.data)
    print(f"{data.name}, network width {args.mlp_width or 'of the preset'}")
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} CPUs; {args.steps} steps of "
          f"{args.batch}; load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}", flush=True)
    rows = []
    for seed in range(args.seeds):
        train_index, test_index = split_indices(data.labels, 0.3, seed)
        for heads in args.heads.split(","):
            config, parts, state, seconds, loss = train(
                heads, data.images[train_index], data.labels[train_index], args.steps, args.batch, seed,
                args.mlp_width)
            accs = [accuracy(parts, state.ema_params, data.images[test_index], data.labels[test_index], n, seed)
                    for n in draws]
            rows.append(f"| {heads} | {seed} | {len(train_index)} / {len(test_index)} | {loss:.4f} | "
                        f"{1e3 * seconds / args.steps:.1f} | " + " | ".join(f"{a:.3f}" for a in accs) + " |")
            print(rows[-1], flush=True)
    print()
    print("| class heads | seed | train / held-out | ε-loss (last 100 steps) | ms / step | "
          + " | ".join(f"accuracy, num_t = {n}" for n in draws) + " |")
    print("|---|---|---|---|---|" + "---|" * len(draws))
    print("\n".join(rows))


if __name__ == "__main__":
    main()
