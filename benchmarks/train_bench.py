"""Cost of one HMDM train step against a plain conditional DDPM step plus K no-grad forward passes (CPU).

The HMDM step (``hmdm_jax.hmdm.make_train_step``) does, per batch of B sequences of n frames: K·num_t
no-grad ε-network passes over the B·n frames to score every class (``em.e_step_scores``), forward
filtering / backward sampling per sequence (``hmm.ffbs``), one ε-loss gradient step on the B·n
frames with the sampled states, and the M-step. Its floor is therefore a plain conditional DDPM
step on the same frames (``mixture.make_supervised_step``, labels given) plus the scoring passes.

Timed in one run, interleaved repeat by repeat (alternating order), on the same network, parameters
and frames, each jitted, compilation excluded (a warm-up call), every call ended with
``block_until_ready``, median of the repeats:

* ``hmdm step``: the HMDM step, batch ``{"images": [B, n, *event], "mask": [B, n] (all True),
  "labels": [B, n] (all −1)}``;
* ``plain step``: the supervised step on the same B·n frames with random labels;
* ``K fwd``: K forward passes ``eps_fn(params, z [B·n, *event], t, k)``, one per class (vmap over k);
* ``K·num_t fwd``: the same on num_t noisy copies of each frame, the network work of the default
  ``eps_mse`` emission (``config.em.num_t`` t-draws per frame, 1 in the HMDM presets);
* ``e_step_scores``: the step's emission pass alone (network + draws + reduction);
* ``ffbs``: the step's HMM pass alone (vmap over B of ``hmm.ffbs`` on [n, K] emissions).

Target (from the issue): hmdm step <= 1.25 x (plain step + K fwd). Not a test:
``.venv/bin/python benchmarks/train_bench.py`` (``--quick`` for a smoke run).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from hmdm_jax import em, hmdm, hmm, mixture, models, run

TARGET = 1.25  # hmdm step / (plain step + K forward passes)


def timed(fn, *args) -> float:
    """Seconds for one call, right after an untimed call of the same function (a warm thread pool)."""
    jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start


def make_config(network: str, num_classes: int, event_shape: tuple[int, ...], num_t: int) -> run.RunConfig:
    """The ``cpu-small`` HMDM preset with ``network`` as the ε-network (its default is ``mlp``) and
    ``num_t`` t-draws per frame in the emission (the preset's default estimator, ``eps_mse``)."""
    config = run.preset("cpu-small", "hmdm", num_classes, event_shape)
    em_config = dataclasses.replace(config.em, num_t=num_t)
    return dataclasses.replace(config, network=models.get_model_config(network), em=em_config)


def make_calls(config: run.RunConfig, batch: int, length: int, seed: int = 0) -> dict:
    """Name -> (jitted function, args) for every timed quantity, on shared parameters and frames."""
    parts = run.build_parts(config)
    state = run.init_state(config, parts)
    k, num_t = config.em.num_classes, config.em.num_t
    rng = np.random.default_rng(seed)
    frames_total = batch * length
    images = rng.uniform(-1.0, 1.0, (batch, length) + config.event_shape).astype(np.float32)
    frames = jnp.asarray(images.reshape((frames_total,) + config.event_shape))
    hmdm_batch = {
        "images": jnp.asarray(images),
        "mask": jnp.ones((batch, length), bool),
        "labels": jnp.full((batch, length), -1, jnp.int32),
    }
    plain_batch = {"images": frames, "labels": jnp.asarray(rng.integers(0, k, frames_total), jnp.int32)}
    key = jax.random.PRNGKey(seed)
    ema = config.optim.ema_decay

    hmdm_step = jax.jit(hmdm.make_train_step(config.em, parts.eps_fn, parts.schedule, parts.optimizer, ema_decay=ema))
    plain_step = jax.jit(
        mixture.make_supervised_step(parts.eps_fn, parts.schedule, parts.optimizer, num_classes=k, ema_decay=ema)
    )

    def all_classes(params, z, t):
        """ε_θ(z, t, k) for every class k: [K, F, *event] (what the emission pass evaluates)."""
        ks = jnp.arange(k, dtype=jnp.int32)
        return jax.vmap(lambda c: parts.eps_fn(params, z, t, jnp.full(t.shape, c)))(ks)

    forward = jax.jit(all_classes)
    t = jnp.asarray(rng.integers(1, config.diffusion.timesteps + 1, frames_total), jnp.int32)
    z_rep = jnp.repeat(frames, num_t, axis=0)
    t_rep = jnp.repeat(t, num_t)

    score = jax.jit(
        lambda params, y, keys, step: em.e_step_scores(config.em, parts.eps_fn, params, parts.schedule, y, keys, step)
    )
    score_keys = em.frame_keys(key, frames_total)
    # Emissions of the size the step produces: tempered eps_mse scores are ≈ −D/T-ish with class gaps.
    log_b = jnp.asarray(-50.0 * rng.random((batch, length, k)), jnp.float32)
    ffbs = jax.jit(jax.vmap(hmm.ffbs, (0, None, None, 0, 0)))
    seq_keys = jax.random.split(key, batch)

    return {
        "hmdm step": (hmdm_step, (state, hmdm_batch, key)),
        "plain step": (plain_step, (state, plain_batch, key)),
        "K fwd": (forward, (state.params, frames, t)),
        "K·num_t fwd": (forward, (state.params, z_rep, t_rep)),
        "e_step_scores": (score, (state.params, frames, score_keys, state.step)),
        "ffbs": (ffbs, (seq_keys, state.log_pi, state.log_A, log_b, hmdm_batch["mask"])),
    }


def bench(config: run.RunConfig, batch: int, length: int, repeats: int) -> dict:
    """Median seconds per call of every quantity of :func:`make_calls`, interleaved."""
    calls = make_calls(config, batch, length)
    for fn, args in calls.values():  # compile
        jax.block_until_ready(fn(*args))
    names = list(calls)
    times = {name: [] for name in names}
    for repeat in range(repeats):
        for name in names if repeat % 2 == 0 else names[::-1]:
            fn, args = calls[name]
            times[name].append(timed(fn, *args))
    return {name: statistics.median(v) for name, v in times.items()}


def report(network: str, config: run.RunConfig, batch: int, length: int, t: dict) -> list[str]:
    """Markdown rows: times (ms) and the ratios against the target's baseline."""
    num_t = config.em.num_t
    base = t["plain step"] + t["K fwd"]
    fair = t["plain step"] + t["K·num_t fwd"]
    ratio, ratio_fair = t["hmdm step"] / base, t["hmdm step"] / fair
    verdict = f"{'met' if ratio <= TARGET else 'MISSED'} ({ratio:.2f} vs <= {TARGET})"
    ms = lambda x: f"{1e3 * x:.1f}"
    return [
        f"| {network} | {'x'.join(map(str, config.event_shape))} | {batch}x{length} = {batch * length} | {num_t} "
        f"| {ms(t['hmdm step'])} | {ms(t['plain step'])} | {ms(t['K fwd'])} | {ms(t['K·num_t fwd'])} "
        f"| {ms(t['e_step_scores'])} | {ms(t['ffbs'])} | {ratio:.2f} | {ratio_fair:.2f} | {verdict} |",
    ]


HEADER = (
    "| network | event | B x n = frames | num_t | hmdm step | plain step | K fwd | K·num_t fwd | e_step_scores | ffbs "
    "| hmdm / (plain + K fwd) | hmdm / (plain + K·num_t fwd) | target |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def breakdown(t: dict) -> str:
    """Where the HMDM step's time goes, as shares of it (the rest: gradient bookkeeping, M-step, RNG)."""
    step = t["hmdm step"]
    rest = step - t["plain step"] - t["e_step_scores"] - t["ffbs"]
    parts = [("plain step (ε-loss gradient + Adam + EMA)", t["plain step"]), ("e_step_scores", t["e_step_scores"]),
             ("ffbs", t["ffbs"]), ("rest", rest)]
    return ", ".join(f"{name} {1e3 * x:.1f} ms ({100 * x / step:.0f}%)" for name, x in parts)


DEFAULT_ROWS = "mlp:8x30:1,mlp:8x30:2,mnist28-unet:1x4:1:3"


def parse_rows(spec: str, repeats: int) -> list[tuple[str, int, int, int, int]]:
    """``network:BxN:num_t[:repeats],...`` -> [(network, B, n, num_t, repeats)]."""
    rows = []
    for item in spec.split(","):
        fields = item.split(":")
        batch, length = map(int, fields[1].split("x"))
        rows.append((fields[0], batch, length, int(fields[2]), int(fields[3]) if len(fields) > 3 else repeats))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed calls per quantity (median reported)")
    parser.add_argument("--classes", type=int, default=10, help="K")
    parser.add_argument(
        "--rows", default=DEFAULT_ROWS,
        help="comma-separated network:BxN:num_t[:repeats] (network: a models preset; event shape (8, 8, 1) "
             "for MLPs, the preset's own for U-Nets; num_t: the emission's t-draws, 1 is the default)",
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: mlp on 2x6 frames, 3 repeats")
    args = parser.parse_args()
    if args.quick:
        args.rows, args.repeats = "mlp:2x6:2", 3
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, float32; K = {args.classes}; median of the repeats (ms)")
    lines, notes = [], []
    for network, batch, length, num_t, repeats in parse_rows(args.rows, args.repeats):
        event_shape = (8, 8, 1) if network.startswith("mlp") else models.PRESET_EVENT_SHAPES[network]
        config = make_config(network, args.classes, event_shape, num_t)
        t = bench(config, batch, length, repeats)
        lines += report(network, config, batch, length, t)
        notes.append(f"{network}, {batch}x{length}, num_t = {num_t} ({repeats} repeats): {breakdown(t)}")
        print(lines[-1], flush=True)
    print()
    print(HEADER)
    print("\n".join(lines))
    print()
    print("\n".join(notes))


if __name__ == "__main__":
    main()
