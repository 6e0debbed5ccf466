"""The prepared accelerator check: the ``gpu`` HMDM preset on MNIST Markov sequences for a fixed number of
steps, then its speed, memory and accuracy, and the HMDM / plain step ratio of its network.

Run once on the first accelerator available (≤ 8 minutes on one GPU with the defaults)::

    python benchmarks/device_check.py                          # ../shared/data/mnist, 1,500 steps
    python benchmarks/device_check.py --data tfds:mnist        # where TFDS has MNIST
    python benchmarks/device_check.py --quick                  # CPU smoke run on the 8×8 digits (tests)

What it does, all with the library's own code:

1. MNIST test-set images split 70/30 into train and held-out pools, cyclic Markov sequences (0.8 to the
   next digit) drawn from each, as ``experiments/hmdm.py`` makes them.
2. ``run.train`` with ``run.preset("gpu", "hmdm", ...)`` for ``--steps`` steps (its warm start, hooks and
   checkpoints included). Steps/s is the loop's own logged frame rate, the median over the log intervals
   after the first (which holds the compilation), divided by the frames per step.
3. Held-out Viterbi accuracy after those steps (``run.evaluate``, ``--eval-num-t`` draws), and the
   device's peak memory (``memory_stats()["peak_bytes_in_use"]``; on a CPU, the process's peak RSS).
4. ``benchmarks/train_bench.py``'s interleaved timing of the HMDM, mixture and plain conditional DDPM
   steps of the preset's network on the preset's batch, for its own class heads and for
   ``--compare-heads`` (by default the other setting).

The last line is ``hmdm_step/plain_step: R`` for the preset as it ships. The figures go into
benchmarks/README.md; a JSON record is written to ``WORKDIR/device_check.json``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import jax
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "experiments"))

import hmdm as hmdm_experiment  # noqa: E402
import train_bench  # noqa: E402

from hmdm_jax import run  # noqa: E402

DEFAULT_DATA = f"idx:{ROOT.parent / 'shared' / 'data' / 'mnist'}"
CLASS_HEADS = ("embedding", "multi_head")
STEPS = ("hmdm step", "mixture step", "plain step")  # train_bench's names of the timed steps


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=DEFAULT_DATA, help=f"image source with labels (default {DEFAULT_DATA})")
    p.add_argument("--steps", type=int, default=1500, help="training steps of the gpu preset (default 1500)")
    p.add_argument("--num-sequences", type=int, default=200, help="training sequences")
    p.add_argument("--heldout-sequences", type=int, default=100, help="held-out sequences")
    p.add_argument("--length", type=int, default=30, help="frames per sequence")
    p.add_argument("--eval-num-t", type=int, default=16, help="t-draws per frame of the held-out decoding")
    p.add_argument("--class-heads", choices=CLASS_HEADS, default=None,
                   help="the trained network's class heads (default: the preset's)")
    p.add_argument("--bench-repeats", type=int, default=7, help="interleaved timed calls per step (median)")
    p.add_argument("--workdir", default="runs/device_check", help="run folder (replaced)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true",
                   help="CPU smoke run: the 8×8 digits, 6 steps, a small MLP with dropout, tiny sequences and timings")
    args = p.parse_args(argv)
    if args.quick:
        args.data, args.steps, args.num_sequences, args.heldout_sequences, args.length = "digits", 6, 6, 3, 6
        args.eval_num_t, args.bench_repeats = 1, 1
    for name in ("steps", "num_sequences", "heldout_sequences", "length", "eval_num_t", "bench_repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def sequences(args):
    """Train and held-out sequences from disjoint 70/30 image pools, cyclic chain (the main job's)."""
    return hmdm_experiment.make_sequences(source=args.data, seed=args.seed, num_sequences=args.num_sequences,
                                          heldout_sequences=args.heldout_sequences, length=args.length)


def make_config(args, k: int, event_shape: tuple[int, ...]) -> run.RunConfig:
    config = run.preset("gpu", "hmdm", k, event_shape, source=args.data)
    network = config.network if args.class_heads is None else dataclasses.replace(config.network,
                                                                                  class_heads=args.class_heads)
    loop = dataclasses.replace(config.loop, train_steps=args.steps, log_every=max(1, min(50, args.steps // 10)),
                               checkpoint_every=0)
    evaluation = dataclasses.replace(config.evaluation, every=0)
    warm = dataclasses.replace(config.warm_start, steps=min(config.warm_start.steps, args.steps // 3))
    config = dataclasses.replace(config, network=network, loop=loop, evaluation=evaluation, warm_start=warm,
                                 seed=args.seed)
    if args.quick:  # a tiny batch, T and network (an MLP with the preset's dropout: U-Nets compile for minutes)
        config = run.apply_overrides(config, ["loop.batch_size=2", "diffusion.timesteps=20", "network.kind=mlp",
                                              "network.mlp_width=32", "network.mlp_depth=2", "network.dropout=0.1"])
    return config


def peak_memory_bytes() -> tuple[int, str]:
    stats = jax.local_devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"]), "device peak_bytes_in_use"
    # ru_maxrss is in KiB on Linux
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "process peak RSS (no device stats)"


def steps_per_second(workdir: Path, frames_per_step: int) -> float:
    rates = [r["frames_per_sec"] for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())
             if "frames_per_sec" in r]
    steady = rates[1:] or rates  # the first interval holds the compilation
    return statistics.median(steady) / frames_per_step


def step_ratios(config: run.RunConfig, heads: str, length: int, repeats: int) -> dict:
    """train_bench's interleaved timings (seconds) for the preset's network with ``heads``."""
    cfg = dataclasses.replace(config, network=dataclasses.replace(config.network, class_heads=heads))
    mixture_cfg = dataclasses.replace(cfg, model_type="mixture",
                                      em=cfg.em.replace(scoring=dict(num_t=2)))
    t = train_bench.bench(cfg, mixture_cfg, config.loop.batch_size, length, repeats, names=STEPS)
    hmdm_ratio, mixture_ratio = train_bench.ratios(t)
    return {"class_heads": heads, "seconds": t, "hmdm_step/plain_step": hmdm_ratio,
            "mixture_step/plain_step": mixture_ratio, "frames": config.loop.batch_size * length}


def main(argv=None):
    args = parse_args(argv)
    device = jax.devices()[0]
    print(f"jax {jax.__version__}, {len(jax.devices())} × {device.platform} ({device.device_kind}); "
          f"{os.cpu_count()} CPUs", flush=True)
    train_seqs, held_seqs, true_A = sequences(args)
    k = train_seqs.num_classes
    config = make_config(args, k, train_seqs.images.shape[2:])
    print(f"gpu preset: {config.network.kind} ({config.network.class_heads}), batch {config.loop.batch_size} "
          f"sequences × {args.length} frames, T = {config.diffusion.timesteps}, {args.steps} steps", flush=True)
    workdir = Path(args.workdir)
    train_data = hmdm_experiment.to_train_data(train_seqs, np.zeros_like(train_seqs.mask))
    held_data = hmdm_experiment.to_train_data(held_seqs, np.zeros_like(held_seqs.mask))
    t0 = time.perf_counter()
    result = run.train(config, train_data, workdir, overwrite=True, progress=False, true_A=true_A)
    train_seconds = time.perf_counter() - t0
    rate = steps_per_second(workdir, config.loop.batch_size * args.length)
    t0 = time.perf_counter()
    ev = run.evaluate(result.config, result.parts, result.state, train_data, held_data, num_t=args.eval_num_t,
                      true_A=true_A)
    eval_seconds = time.perf_counter() - t0
    memory, memory_kind = peak_memory_bytes()
    print(f"steps/s: {rate:.2f} (loop's own rate after the first log interval); train wall {train_seconds:.0f} s "
          f"(compilation, warm start and hooks included)")
    print(f"held-out Viterbi accuracy after {args.steps} steps: {ev['heldout_accuracy']:.4f} "
          f"(num_t = {args.eval_num_t}; A error {ev.get('A_mae', float('nan')):.4f}; {eval_seconds:.0f} s)")
    print(f"peak memory: {memory / 2**30:.2f} GiB ({memory_kind})", flush=True)
    shipped = config.network.class_heads
    ratios = [step_ratios(config, heads, args.length, args.bench_repeats)
              for heads in (shipped,) + tuple(h for h in CLASS_HEADS if h != shipped)]
    for r in ratios:
        s = r["seconds"]
        print(f"{r['class_heads']}: hmdm step {1e3 * s['hmdm step']:.1f} ms, mixture step "
              f"{1e3 * s['mixture step']:.1f} ms, plain step {1e3 * s['plain step']:.1f} ms on {r['frames']} frames: "
              f"hmdm/plain {r['hmdm_step/plain_step']:.2f}, mixture/plain {r['mixture_step/plain_step']:.2f}")
    record = {
        "command": " ".join(sys.argv), "jax": jax.__version__, "device": f"{device.platform} {device.device_kind}",
        "devices": len(jax.devices()), "steps": args.steps, "steps_per_second": rate, "train_seconds": train_seconds,
        "heldout_accuracy": float(ev["heldout_accuracy"]), "A_mae": ev.get("A_mae"), "eval_num_t": args.eval_num_t,
        "eval_seconds": eval_seconds, "peak_memory_bytes": memory, "peak_memory_kind": memory_kind,
        "step_ratios": ratios, "seed": args.seed, "data": args.data,
    }
    (workdir / "device_check.json").write_text(json.dumps(record, indent=2, default=float))
    print(f"wrote {workdir / 'device_check.json'}")
    print(f"hmdm_step/plain_step: {ratios[0]['hmdm_step/plain_step']:.2f}")
    return record


if __name__ == "__main__":
    main()
