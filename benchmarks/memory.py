"""Per-frame memory of the HMDM train step for every network the run presets train, from the compiled step.

For each row (by default every network of the ``cpu-small`` and ``gpu`` presets at the frame shapes they are
used for, with the preset's own E-step: one-pass class heads, one t-draw) the HMDM train step
(``hmdm.make_train_step``, K = 10, no emission chunking, n = 30 frames per sequence) is lowered and compiled
for two batch sizes (16 and 32 sequences: large enough that the peak grows linearly with the batch for every
config), never run (the state and batch are abstract ``jax.ShapeDtypeStruct``s, so nothing is allocated):

    jax.jit(step, donate_argnums=0).lower(state, batch, key).compile().memory_analysis()

The step's footprint is temp + argument + output − alias bytes (the state is donated, as the training
loop ``run.parts.make_step`` does, so the new state reuses the old one's buffers: alias = the state). The
per-frame memory is the difference between the two batch sizes divided by the difference in frames;
the fixed part (parameters, EMA, Adam moments, workspace) is what is left at zero frames. From these,
the largest batch that fits an accelerator of 16 GiB and 80 GiB with 10% headroom. Rows ``name@c``
repeat a row with ``EMConfig.scoring.chunk_size = c``: the emission pass (num_t network evaluations per
frame with one-pass heads, K · num_t with per-class conditioning, all live at once) is what dominates the
per-frame memory of the U-Nets, and chunking it bounds that part.

Measured on the CPU backend's compiled step: GPU/TPU compilers fuse, tile and pick convolution
algorithms differently (and TPUs pad minor dimensions to 128), so their figures differ somewhat; treat
the table as an estimate and check with ``memory_analysis()`` on the target device. Not a test:
``.venv/bin/python benchmarks/memory.py`` (``--quick``: the ``cpu-small`` MLPs only).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import time

# Only the LLVM code generation is made cheaper (it halves the U-Nets' compile time on CPU); the
# HLO passes and the buffer assignment that memory_analysis() reports are unchanged (checked: the
# same bytes with and without these flags).
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
).strip()

import jax  # noqa: E402  (after XLA_FLAGS)
import jax.numpy as jnp  # noqa: E402

from hmdm_jax import hmdm, models, run  # noqa: E402
from hmdm_jax.state import create_train_state  # noqa: E402

GIB = 2**30
CAPACITIES_GIB = (16, 80)
HEADROOM = 0.10
MLP_EVENT_SHAPE = (64,)


def event_shape_for(name: str) -> tuple[int, ...]:
    """The frame shape a preset is measured at: its own for U-Nets, (64,) for the MLPs."""
    return MLP_EVENT_SHAPE if name.startswith("mlp") else models.PRESET_EVENT_SHAPES[name]


def abstract_state(config: run.RunConfig, parts: run.parts.RunParts):
    """``run.init_state``'s TrainState as ``ShapeDtypeStruct`` leaves, without computing anything.

    Built from ``models.param_shapes`` rather than by tracing ``init_state``: the parameter initialiser
    is a top-level jit with its own compiler options, which cannot be traced inside ``eval_shape``.
    """
    params = models.param_shapes(parts.model, config.event_shape)
    return jax.eval_shape(
        lambda p: create_train_state(
            jax.random.PRNGKey(config.seed), p, parts.optimizer, config.em.num_classes
        ),
        params,
    )


def step_bytes(config: run.RunConfig, parts: run.parts.RunParts, batch: int, length: int) -> dict:
    """memory_analysis() of the compiled, donated HMDM step for ``batch`` sequences of ``length`` frames."""
    state = abstract_state(config, parts)
    sds = jax.ShapeDtypeStruct
    batch_spec = {
        "images": sds((batch, length) + config.event_shape, jnp.float32),
        "mask": sds((batch, length), jnp.bool_),
        "labels": sds((batch, length), jnp.int32),
    }
    key = sds((2,), jnp.uint32)
    step = hmdm.make_train_step(
        config.em, parts.eps_fn, parts.schedule, parts.optimizer, ema_decay=config.optim.ema_decay
    )
    analysis = jax.jit(step, donate_argnums=0).lower(state, batch_spec, key).compile().memory_analysis()
    sizes = {
        "temp": analysis.temp_size_in_bytes,
        "argument": analysis.argument_size_in_bytes,
        "output": analysis.output_size_in_bytes,
        "alias": analysis.alias_size_in_bytes,
    }
    sizes["total"] = sizes["temp"] + sizes["argument"] + sizes["output"] - sizes["alias"]
    return sizes


def fit(per_frame: float, fixed: float, capacity_gib: float, length: int) -> tuple[int, int]:
    """(frames, whole sequences of ``length``) that fit ``capacity_gib`` with HEADROOM left free."""
    frames = max(int(((1.0 - HEADROOM) * capacity_gib * GIB - fixed) // per_frame), 0)
    return frames, frames // length


# the networks the run presets train, each at the frame shape it is used for, with the preset's own E-step draws
PRESET_ROWS = ("cpu-small:8x8x1", "cpu-small:28x28x1", "gpu:8x8x1", "gpu:28x28x1", "gpu:32x32x3")


def parse_config(spec: str) -> tuple[str, str | None, int | None]:
    """``"name[+heads][@chunk]"`` -> (name, class heads or None, chunk): ``+multi_head`` sets
    ``ModelConfig.class_heads``; ``@c`` scores the emission ``c`` frames per network call. A name
    ``"PRESET:HxWxC"`` is the network and E-step of that run preset at that frame shape."""
    spec, _, chunk = spec.partition("@")
    name, _, heads = spec.partition("+")
    return name, heads or None, int(chunk) if chunk else None


def row_config(name: str, heads: str | None, chunk: int | None, num_classes: int) -> tuple[run.RunConfig, str]:
    """The HMDM config measured for a row, and its label."""
    if ":" in name:  # a run preset's own network and t-draws
        preset, _, shape = name.partition(":")
        config = run.preset(preset, "hmdm", num_classes, tuple(int(d) for d in shape.split("x")))
        net = config.network
        layout = (f"mlp width {net.mlp_width}" + (", input skip" if net.mlp_input_skip else "") if net.kind == "mlp"
                  else f"unet width {net.base_width}")
        label = f"`{preset}` {shape} ({layout}, {net.class_heads}, {config.em.scoring.num_t} t-draw)"
    else:
        config = run.preset("cpu-small", "hmdm", num_classes, event_shape_for(name))
        config = dataclasses.replace(config, network=models.get_model_config(name),
                                     em=config.em.replace(scoring=dict(num_t=2)))
        label = name
    if heads is not None:
        config = dataclasses.replace(config, network=dataclasses.replace(config.network, class_heads=heads))
        label += f", {heads}"
    if chunk is not None:
        config = dataclasses.replace(config, em=config.em.replace(scoring=dict(chunk_size=chunk)))
        label += f", emission chunk {chunk}"
    return config, label


def measure(spec: str, num_classes: int, length: int, batches: tuple[int, int]) -> dict:
    """Per-frame and fixed bytes of the HMDM step of row ``spec`` (see :func:`parse_config`), from two
    compiled batch sizes."""
    name, heads, chunk = parse_config(spec)
    config, label = row_config(name, heads, chunk, num_classes)
    parts = run.build_parts(config)
    start = time.perf_counter()
    small, large = (step_bytes(config, parts, b, length) for b in batches)
    per_frame = (large["total"] - small["total"]) / ((batches[1] - batches[0]) * length)
    # The affine extrapolation to zero frames can land a little below the state itself (XLA's peak is
    # only nearly affine in the batch): the state is always there, so it bounds the fixed part.
    fixed = max(small["total"] - per_frame * batches[0] * length, small["alias"])
    params = models.param_shapes(parts.model, config.event_shape)
    return {
        "name": label,
        "event": config.event_shape,
        "params": models.param_count(params), "per_frame": per_frame,
        "fixed": fixed, "small": small, "large": large, "seconds": time.perf_counter() - start,
        "num_t": config.em.scoring.num_t,
    }


def table(rows: list[dict], num_classes: int, length: int, batches: tuple[int, int]) -> str:
    """The Markdown table of the README's Memory section."""
    caps = " | ".join(f"fits {c} GiB: frames (seq. of {length})" for c in CAPACITIES_GIB)
    lines = [
        f"| config | event | params | per frame (MiB) | fixed (MiB) | state (MiB) | step at B={batches[0]} / B={batches[1]} "
        f"(MiB) | {caps} |",
        "|---|---|---|---|---|---|---|" + "---|" * len(CAPACITIES_GIB),
    ]
    for r in rows:
        fits = " | ".join("{} ({})".format(*fit(r["per_frame"], r["fixed"], c, length)) for c in CAPACITIES_GIB)
        lines.append(
            f"| {r['name']} | {'x'.join(map(str, r['event']))} | {r['params'] / 1e6:.2f} M "
            f"| {r['per_frame'] / 2**20:.2f} | {r['fixed'] / 2**20:.1f} | {r['small']['alias'] / 2**20:.1f} "
            f"| {r['small']['total'] / 2**20:.1f} / {r['large']['total'] / 2**20:.1f} | {fits} |"
        )
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=10, help="K")
    parser.add_argument("--length", type=int, default=30, help="n, frames per sequence")
    parser.add_argument(
        "--batches", default="16,32",
        help="the two batch sizes (sequences) compiled; at 1-2 sequences the MLPs' peak is still set by "
             "parameter-sized buffers and does not grow with the batch, from 16 on every config is linear",
    )
    parser.add_argument(
        "--configs", default=",".join(PRESET_ROWS),
        help="comma-separated rows: PRESET:HxWxC is a run preset's own network and t-draws at that frame shape "
             "(the default: every network the presets train); a network config name (models.PRESET_NAMES) is "
             "measured at 2 t-draws; +multi_head sets the class heads; @c scores the emission c frames per "
             "network call (EMConfig.scoring.chunk_size = c)",
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: the cpu-small presets' MLPs only")
    args = parser.parse_args()
    if args.quick:
        args.configs = "cpu-small:8x8x1,cpu-small:28x28x1"
    batches = tuple(int(b) for b in args.batches.split(","))
    print(f"jax {jax.__version__}, backend {jax.devices()[0].platform}: HMDM train step, K = {args.classes}, "
          f"n = {args.length} frames per sequence, compiled at B = {batches[0]} and {batches[1]} sequences "
          f"(never run); {int(100 * HEADROOM)}% headroom; 1 GiB = 2^30 bytes")
    rows = []
    for name in args.configs.split(","):
        rows.append(measure(name, args.classes, args.length, batches))
        r = rows[-1]
        detail = ", ".join(f"{k} {v / 2**20:.1f}" for k, v in r["large"].items())
        print(f"  {name}: per frame {r['per_frame'] / 2**20:.2f} MiB, fixed {r['fixed'] / 2**20:.1f} MiB "
              f"(B={batches[1]}: {detail} MiB; compiled in {r['seconds']:.0f} s)", flush=True)
    print()
    print(table(rows, args.classes, args.length, batches))


if __name__ == "__main__":
    main()
