"""Cost of one HMDM (and mixture) train step against a plain conditional DDPM step of the same network (CPU).

The HMDM step (``hmdm_jax.hmdm.make_train_step``) does, per batch of B sequences of n frames: the
scoring of every frame under every class (``em.e_step_scores``: K·num_t no-grad ε-network passes with
an embedding-conditioned network, num_t with a multi-head one, whose single pass gives every class's ε),
forward filtering / backward sampling per sequence (``hmm.ffbs``), one ε-loss gradient step on the
B·n frames with the sampled states, and the M-step. Its floor is a plain conditional DDPM step on the
same frames (``mixture.make_supervised_step``, labels given) plus the scoring.

Timed in one run, interleaved repeat by repeat (alternating order), on the same network, parameters
and frames, each jitted, compilation excluded (a warm-up call), every call ended with
``block_until_ready``, median of the repeats:

* ``hmdm step``: the HMDM step (the ``cpu-small`` HMDM preset's E-step options), batch
  ``{"images": [B, n, *event], "mask": [B, n] (all True), "labels": [B, n] (all −1)}``;
* ``mixture step``: the mixture step (the ``cpu-small`` mixture preset's E-step options, num_t = 2)
  on the same B·n frames, labels all −1;
* ``plain step``: the supervised step on the same B·n frames with random labels;
* ``K fwd``: ε for every class on the B·n frames, ``emission.eps_all_classes`` (what the emission
  evaluates per t-draw: one pass with class heads, K passes vmapped over k without);
* ``e_step_scores``: the HMDM step's emission pass alone (network + draws + reduction);
* ``ffbs``: the step's HMM pass alone (vmap over B of ``hmm.ffbs`` on [n, K] emissions).

A row's network is ``NAME[+HEADS][@SHAPE]``: NAME is ``cpu-small`` (the ``cpu-small`` preset's own network,
as the presets ship it) or a ``models`` preset; ``+multi_head`` / ``+embedding`` sets
``ModelConfig.class_heads``, ``+rank32`` multi-head with ``head_rank=32``; ``@28x28x1`` the frames' shape (``cpu-small@28x28x1`` is the network that preset
ships for 28×28 frames, 512 wide with the input skip). The script ends with ``mixture_step/plain_step: M`` and, as its last line,
``hmdm_step/plain_step: R`` for the first row (by default ``cpu-small``, the shipped network).

Target (from the issue): hmdm step <= 1.3 x plain step with the one-pass network. Not a test:
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

from hmdm_jax import em, emission, hmdm, hmm, mixture, models, run

TARGET = 1.3  # hmdm step / plain step, with the one-pass (multi-head) network


def timed(fn, *args) -> float:
    """Seconds for one call, right after an untimed call of the same function (a warm thread pool)."""
    jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start


def network_config(spec: str, num_classes: int, event_shape: tuple[int, ...]) -> models.ModelConfig:
    """``NAME[+HEADS][@SHAPE]`` -> the ModelConfig: ``cpu-small`` is that preset's network for the event
    shape, else a models preset."""
    name, _, heads = spec.partition("@")[0].partition("+")
    if name == "cpu-small":
        network = run.preset("cpu-small", "hmdm", num_classes, event_shape).network
    else:
        network = models.get_model_config(name)
    if heads.startswith("rank"):  # +rankR: multi-head with a shared projection and rank-R class terms
        return dataclasses.replace(network, class_heads="multi_head", head_rank=int(heads[4:]))
    return dataclasses.replace(network, class_heads=heads) if heads else network


def event_shape_for(spec: str) -> tuple[int, ...]:
    """The ``@HxWxC`` of the spec (``cpu-small@28x28x1``: the ``cpu-small`` network of 28×28 frames), else
    (8, 8, 1) digits for the MLPs and ``cpu-small``, the preset's own shape for U-Nets."""
    spec, _, shape = spec.partition("@")
    if shape:
        return tuple(int(d) for d in shape.split("x"))
    name = spec.partition("+")[0]
    if name == "cpu-small" or models.get_model_config(name).kind == "mlp":
        return (8, 8, 1)
    return models.PRESET_EVENT_SHAPES[name]


def make_config(spec: str, num_classes: int, event_shape: tuple[int, ...], num_t: int,
                model_type: str = "hmdm") -> run.RunConfig:
    """The ``cpu-small`` preset of ``model_type`` with the network of ``spec`` and, for the HMDM,
    ``num_t`` t-draws per frame in the emission (the preset's default estimator, ``eps_mse``)."""
    config = run.preset("cpu-small", model_type, num_classes, event_shape)
    if model_type == "hmdm":
        config = dataclasses.replace(config, em=config.em.replace(scoring=dict(num_t=num_t)))
    return dataclasses.replace(config, network=network_config(spec, num_classes, event_shape))


def make_calls(config: run.RunConfig, mixture_config: run.RunConfig, batch: int, length: int,
               seed: int = 0) -> dict:
    """Name -> (jitted function, args) for every timed quantity, on shared parameters and frames."""
    parts = run.build_parts(config)
    state = run.init_state(config, parts)
    k = config.em.num_classes
    rng = np.random.default_rng(seed)
    frames_total = batch * length
    images = rng.uniform(-1.0, 1.0, (batch, length) + config.event_shape).astype(np.float32)
    frames = jnp.asarray(images.reshape((frames_total,) + config.event_shape))
    hmdm_batch = {
        "images": jnp.asarray(images),
        "mask": jnp.ones((batch, length), bool),
        "labels": jnp.full((batch, length), -1, jnp.int32),
    }
    mixture_batch = {"images": frames, "labels": jnp.full((frames_total,), -1, jnp.int32)}
    plain_batch = {"images": frames, "labels": jnp.asarray(rng.integers(0, k, frames_total), jnp.int32)}
    key = jax.random.PRNGKey(seed)
    ema = config.optim.ema_decay

    # every step trains as the run does: with dropout when the network has it
    train_eps_fn = parts.train_eps_fn
    hmdm_step = jax.jit(hmdm.make_train_step(config.em, parts.eps_fn, parts.schedule, parts.optimizer, ema_decay=ema,
                                             train_eps_fn=train_eps_fn))
    mixture_step = jax.jit(mixture.make_train_step(mixture_config.em, parts.eps_fn, parts.schedule, parts.optimizer,
                                                   ema_decay=ema, train_eps_fn=train_eps_fn))
    plain_step = jax.jit(mixture.make_supervised_step(
        parts.eps_fn, parts.schedule, parts.optimizer, num_classes=k, label_dropout=config.em.labels.dropout,
        ema_decay=ema, train_eps_fn=train_eps_fn))
    forward = jax.jit(lambda params, z, t: emission.eps_all_classes(parts.eps_fn, params, z, t, k))
    t = jnp.asarray(rng.integers(1, config.diffusion.timesteps + 1, frames_total), jnp.int32)

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
        "mixture step": (mixture_step, (state, mixture_batch, key)),
        "plain step": (plain_step, (state, plain_batch, key)),
        "K fwd": (forward, (state.params, frames, t)),
        "e_step_scores": (score, (state.params, frames, score_keys, state.step)),
        "ffbs": (ffbs, (seq_keys, state.log_pi, state.log_A, log_b, hmdm_batch["mask"])),
    }


def bench(config: run.RunConfig, mixture_config: run.RunConfig, batch: int, length: int, repeats: int,
          names: tuple[str, ...] | None = None) -> dict:
    """Median seconds per call of every quantity of :func:`make_calls` (or of ``names``), interleaved."""
    calls = make_calls(config, mixture_config, batch, length)
    calls = calls if names is None else {name: calls[name] for name in names}
    for fn, args in calls.values():  # compile
        jax.block_until_ready(fn(*args))
    names = list(calls)
    times = {name: [] for name in names}
    for repeat in range(repeats):
        for name in names if repeat % 2 == 0 else names[::-1]:
            fn, args = calls[name]
            times[name].append(timed(fn, *args))
    return {name: statistics.median(v) for name, v in times.items()}


def ratios(t: dict) -> tuple[float, float]:
    """(hmdm step / plain step, mixture step / plain step)."""
    return t["hmdm step"] / t["plain step"], t["mixture step"] / t["plain step"]


def report(spec: str, config: run.RunConfig, mixture_config: run.RunConfig, batch: int, length: int,
           t: dict) -> str:
    """One Markdown row: times (ms) and the ratios."""
    hmdm_ratio, mixture_ratio = ratios(t)
    verdict = "met" if hmdm_ratio <= TARGET else "MISSED"
    ms = lambda x: f"{1e3 * x:.1f}"
    return (
        f"| {spec} | {config.network.class_heads}{f' rank {config.network.head_rank}' if config.network.head_rank else ''} | {models.param_count(models.param_shapes(models.build_model(config.network, config.num_classes), config.event_shape)):,} "
        f"| {'x'.join(map(str, config.event_shape))} | {batch}x{length} = {batch * length} "
        f"| {config.em.scoring.num_t} / {mixture_config.em.scoring.num_t} "
        f"| {ms(t['hmdm step'])} | {ms(t['mixture step'])} | {ms(t['plain step'])} | {ms(t['K fwd'])} "
        f"| {ms(t['e_step_scores'])} | {ms(t['ffbs'])} | **{hmdm_ratio:.2f}** | {mixture_ratio:.2f} "
        f"| {t['hmdm step'] / (t['plain step'] + t['K fwd']):.2f} | {verdict} |"
    )


HEADER = (
    "| network | class heads | params | event | B x n = frames | num_t hmdm / mixture | hmdm step | mixture step "
    "| plain step | K fwd | e_step_scores | ffbs | hmdm / plain | mixture / plain | hmdm / (plain + K fwd) "
    f"| hmdm / plain <= {TARGET} |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def breakdown(t: dict) -> str:
    """Where the HMDM step's time goes, as shares of it (the rest: gradient bookkeeping, M-step, RNG)."""
    step = t["hmdm step"]
    rest = step - t["plain step"] - t["e_step_scores"] - t["ffbs"]
    parts = [("plain step (ε-loss gradient + Adam + EMA)", t["plain step"]), ("e_step_scores", t["e_step_scores"]),
             ("ffbs", t["ffbs"]), ("rest", rest)]
    return ", ".join(f"{name} {1e3 * x:.1f} ms ({100 * x / step:.0f}%)" for name, x in parts)


DEFAULT_ROWS = "cpu-small:8x30:1,cpu-small+embedding:8x30:1,cpu-small+multi_head:8x30:1"


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
        help="comma-separated network:BxN:num_t[:repeats]; network: NAME[+multi_head|+embedding|+rankR][@HxWxC], NAME "
             "'cpu-small' (that preset's network) or a models preset; event shape @HxWxC, else (8, 8, 1) for "
             "MLPs and the preset's own for U-Nets; num_t: the HMDM emission's t-draws (the preset's is 1). The last "
             "lines of the output are the ratios of the first row",
    )
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: cpu-small and cpu-small+multi_head on 2x6 frames, 3 repeats")
    args = parser.parse_args()
    if args.quick:
        args.rows, args.repeats = "cpu-small:2x6:1,cpu-small+multi_head:2x6:1", 3
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, float32; K = {args.classes}; median of the repeats (ms); "
          f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}", flush=True)
    lines, notes, results, measured = [], [], [], {}
    for spec, batch, length, num_t, repeats in parse_rows(args.rows, args.repeats):
        event_shape = event_shape_for(spec)
        config = make_config(spec, args.classes, event_shape, num_t)
        mixture_config = make_config(spec, args.classes, event_shape, num_t, "mixture")
        cache_key = (config.network, event_shape, batch, length, num_t, repeats)
        if cache_key not in measured:  # e.g. ``cpu-small`` and ``cpu-small+embedding`` while they agree
            measured[cache_key] = bench(config, mixture_config, batch, length, repeats)
        t = measured[cache_key]
        lines.append(report(spec, config, mixture_config, batch, length, t))
        results.append(ratios(t))
        notes.append(f"{spec}, {batch}x{length}, num_t = {num_t} ({repeats} repeats): {breakdown(t)}")
        print(lines[-1], flush=True)
    print()
    print(HEADER)
    print("\n".join(lines))
    print()
    print("\n".join(notes))
    print(f"load average at the end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    hmdm_ratio, mixture_ratio = results[0]
    print(f"mixture_step/plain_step: {mixture_ratio:.2f}")
    print(f"hmdm_step/plain_step: {hmdm_ratio:.2f}")

if __name__ == "__main__":
    main()
