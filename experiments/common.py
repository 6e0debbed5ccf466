"""What the experiment scripts share: the common flags, data preparation, reports and figures.

Experiments are thin: they parse flags, build data with ``hmdm_jax.data``, train with ``hmdm_jax.run``
and write ``results.json`` and figures into the work directory. Nothing in ``hmdm_jax`` imports this.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np

from hmdm_jax import data as hdata
from hmdm_jax import parallel
from hmdm_jax import run


def at_least(minimum: int):
    """An argparse type: an int >= ``minimum`` (a zero or negative value is refused, never replaced)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    return parse


def main_of(main):
    """``main(argv)`` with the library's input errors as one line ``error: ...`` on stderr and exit code 2.

    The library raises ``ValueError`` (``checkpoint.CheckpointError`` is one) or ``FileNotFoundError``
    for bad data, configs, workdirs and checkpoints; anything else is a bug and keeps its traceback.
    """
    def guarded(argv=None):
        try:
            return main(argv)
        except (ValueError, FileNotFoundError) as e:
            fail(str(e))
    return guarded


def check_workdir(workdir: Path) -> None:
    """Refuses a workdir that is a file, or that lies under a file (it could never be created)."""
    if workdir.exists() and not workdir.is_dir():
        fail(f"--workdir {workdir} exists and is not a directory")
    for parent in Path(workdir).absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                fail(f"--workdir {workdir}: {parent} is a file, not a folder")
            break


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="digits", help=hdata.SOURCE_HELP)
    p.add_argument("--workdir", required=True, help="output directory: config, checkpoints, metrics.jsonl, results.json, figures")
    p.add_argument("--preset", default="cpu-small", choices=("cpu-small", "gpu", "tpu"), help="run preset (default cpu-small)")
    p.add_argument("--num-classes", type=at_least(1), default=None, help="K (default: the number of classes of the data)")
    p.add_argument("--classes", default=None, metavar="C1,C2,...",
                   help="image sources: keep only these classes, relabelled 0..K−1 in this order (e.g. 0,1,2,3,4)")
    p.add_argument("--observed-labels", type=float, default=0.0,
                   help="fraction F of labelled training frames whose label is clamped in training (default 0: unsupervised)")
    p.add_argument("--seed", type=at_least(0), default=0, help="seed of the data split, sequences, initialisation and draws")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in WORKDIR")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in WORKDIR (without it, a used WORKDIR is refused)")
    p.add_argument("--steps", type=at_least(1), default=None, help="training steps (overrides the preset's loop.train_steps)")
    p.add_argument("--set", nargs="*", default=[], metavar="SECTION.FIELD=VALUE",
                   help="config overrides, e.g. em.temperature.final=0.2 loop.batch_size=16")
    p.add_argument("--distributed", action="store_true",
                   help="multi-host: call jax.distributed.initialize() first (TPU pod slices discover their hosts; "
                        "GPU nodes read JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID or Slurm)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-figures", action="store_true", help="skip figures")
    return p


def observed_mask(labels: np.ndarray, fraction: float, seed: int, valid: np.ndarray | None = None) -> np.ndarray:
    """A random ``fraction`` of the labelled (≥ 0) valid entries, as a bool mask of ``labels``' shape."""
    if not 0.0 <= fraction <= 1.0:
        fail(f"--observed-labels must be in [0, 1], got {fraction}")
    candidates = np.flatnonzero((labels >= 0) & (True if valid is None else valid))
    rng = np.random.default_rng([seed, 17])
    chosen = rng.choice(candidates, size=int(round(fraction * len(candidates))), replace=False)
    mask = np.zeros(labels.size, bool)
    mask[chosen] = True
    return mask.reshape(labels.shape)


def build_config(args, model_type: str, num_classes: int, event_shape, **data_record) -> run.RunConfig:
    if getattr(args, "distributed", False):
        parallel.initialize_distributed()  # before the first JAX computation of the run
    config = run.preset(args.preset, model_type, num_classes, event_shape, **data_record)
    overrides = [f"seed={args.seed}"] + ([f"loop.train_steps={args.steps}"] if args.steps is not None else []) + list(args.set)
    return run.apply_overrides(config, overrides)  # a bad override is a ValueError: one line via main_of


def print_config(config: run.RunConfig) -> None:
    print(json.dumps(config.to_dict(), indent=1, default=str), flush=True)


def write_results(workdir: Path, results: dict) -> None:
    path = Path(workdir) / "results.json"
    path.write_text(json.dumps(results, indent=2, default=_default))
    print(f"wrote {path}", flush=True)


def _default(o):
    if isinstance(o, (np.ndarray, jax.Array)):
        return np.asarray(o).tolist()
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    return str(o)


def read_metrics(workdir: Path) -> list[dict]:
    path = Path(workdir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


def stopped(workdir: Path, result) -> dict:
    """After Ctrl-C/SIGTERM: the checkpoint is saved; skip evaluation and say how to continue."""
    if result.state is None:  # during the restarts, before the first checkpoint
        print("stopped during the restarts, before the first checkpoint: start again with --overwrite", flush=True)
        return {"stopped_early": True, "steps": 0}
    step = int(result.state.step)
    print(f"stopped at step {step}; checkpoint saved in {Path(workdir) / 'checkpoints'}. "
          f"Continue with the same command and --resume.", flush=True)
    return {"stopped_early": True, "steps": step}


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def load_images(source: str, classes: str | None):
    """The image source, restricted to ``classes`` (the ``--classes`` text) when given."""
    images = hdata.load_source(source)
    return images if classes is None else hdata.select_classes(images, hdata.parse_classes(classes))
