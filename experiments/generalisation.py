#!/usr/bin/env python
"""The HMDM defaults on chains they were not tuned on, beside the tuned Gaussian HMM on the same split.

Runs ``experiments/hmdm.py`` (same flags, same preset) once per setting and seed, each in its own workdir
``WORKDIR/<setting>_s<seed>``, and writes ``WORKDIR/generalisation.md`` and ``.json``: held-out Viterbi
accuracy, A error, the frame-wise accuracy of the same network (its emissions without the chain), the
tuned Gaussian HMM, the frame-wise baselines, the diffusion mixture trained on the frames of the same image
pools (``experiments/mixture.py --heldout-fraction 0.3``, one per seed: the pools do not depend on the chain;
``--no-mixture`` skips it), the warm start of the restart the bound chose, and the wall time. A workdir that already holds
``results.json`` is read, not retrained, so an interrupted table resumes where it stopped.

Settings (``--settings``, comma-separated): ``cyclic0.8`` (the main job), ``sticky0.9``, ``sticky0.7``,
``dirichlet``, ``cyclic0.5``; each is ``--transition KIND --stay P`` of ``hmdm.py``. ``npz-SETTING`` runs
the user's path instead: the same sequences cut to random lengths 12–30 are written to ``train.npz`` and
``heldout.npz``, ``hmdm.py --data npz:train.npz`` trains, ``decode.py`` decodes ``heldout.npz``, and the
tuned Gaussian HMM is fitted on train.npz and decoded on heldout.npz.

Example:
  python experiments/generalisation.py --workdir runs/generalisation --seeds 0 1 2
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np

import common
import decode as decode_experiment
import hmdm as hmdm_experiment
import mixture as mixture_experiment
from hmdm_jax import data as hdata
from hmdm_jax import metrics, run

SETTINGS = ("cyclic0.8", "sticky0.9", "sticky0.7", "dirichlet", "cyclic0.5")


def setting_flags(name: str) -> list[str]:
    """``"sticky0.9"`` → ``["--transition", "sticky", "--stay", "0.9"]`` (``npz-`` prefix allowed)."""
    match = re.fullmatch(r"(?:npz-)?(cyclic|sticky|dirichlet)([0-9.]*)", name)
    if match is None:
        raise ValueError(f"unknown setting {name!r}: expected cyclicP, stickyP or dirichlet")
    kind, stay = match.groups()
    return ["--transition", kind] + (["--stay", stay] if stay else [])


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="one sub-directory per setting and seed, and the table")
    p.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated (default {','.join(SETTINGS)})")
    p.add_argument("--seeds", type=common.at_least(0), nargs="+", default=[0])
    p.add_argument("--data", default="digits")
    p.add_argument("--preset", default="cpu-small")
    p.add_argument("--set", nargs="*", default=[], metavar="SECTION.FIELD=VALUE", help="passed to hmdm.py")
    p.add_argument("--no-mixture", action="store_true", help="skip the frame-wise diffusion mixture")
    args = p.parse_args(argv)
    args.settings = [s for s in args.settings.split(",") if s]
    for name in args.settings:
        setting_flags(name)  # an unknown name fails before anything runs
    return args


def write_npz(path: Path, seqs, rng) -> None:
    """Sequences as a user's .npz: uint8 frames, each cut to a random length in 12..n (labels for scoring)."""
    n = seqs.images.shape[1]
    lengths = rng.integers(min(12, n), n + 1, len(seqs.images))
    images = np.round((seqs.images[..., 0] + 1.0) * 127.5).clip(0, 255).astype(np.uint8)
    labels = np.where(np.arange(n)[None] < lengths[:, None], seqs.labels, -1).astype(np.int32)
    np.savez(path, images=images, lengths=lengths, labels=labels, num_classes=seqs.num_classes)


def run_npz(args, name: str, seed: int, workdir: Path) -> dict:
    """The npz path of ``name``: write, train on train.npz, decode heldout.npz, Gaussian HMM on the same files."""
    flags = setting_flags(name)
    train, held, _ = hmdm_experiment.make_sequences(source=args.data, seed=seed, transition=flags[1],
                                                    stay=float(flags[3]) if len(flags) > 2 else 0.8)
    workdir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 7])
    write_npz(workdir / "train.npz", train, rng)
    write_npz(workdir / "heldout.npz", held, rng)
    t0 = time.perf_counter()
    argv = ["--data", f"npz:{workdir / 'train.npz'}", "--preset", args.preset, "--workdir", str(workdir / "run"),
            "--seed", str(seed), "--overwrite", "--no-progress", "--no-figures", "--heldout-fraction", "0.1"]
    results = hmdm_experiment.main(argv + (["--set", *args.set] if args.set else []))
    if results.get("stopped_early"):
        raise KeyboardInterrupt(f"{name} seed {seed} was stopped: the table stops here, its finished cells are kept")
    decode_experiment.main(["--workdir", str(workdir / "run"), "--input", str(workdir / "heldout.npz"),
                            "--output", str(workdir / "decoded.npz"), "--no-progress"])
    tr, he = (hdata.load_sequences_npz(workdir / f) for f in ("train.npz", "heldout.npz"))
    k = tr.num_classes
    states = np.load(workdir / "decoded.npz")["states"]
    flat = lambda d: d.images.reshape(d.images.shape[:2] + (-1,))
    ghmm = metrics.gaussian_hmm_baseline(flat(tr), tr.mask, flat(he), he.mask, he.labels, k, seed=seed)
    return {"heldout_accuracy": run.score_states(he.labels, states, k)["accuracy"], "A_mae": None,
            "heldout_framewise_accuracy": None, "train_seconds": time.perf_counter() - t0, "eval_seconds": 0.0,
            "train_split_heldout_accuracy": results.get("heldout_accuracy"), "decisions": results.get("decisions"),
            "baselines": {"gaussian_hmm": {"accuracy": ghmm["accuracy"], "pca_dim": ghmm["pca_dim"]},
                          **{m: results["baselines"][m] for m in ("gmm", "kmeans")}}}


def run_one(args, name: str, seed: int) -> dict:
    workdir = Path(args.workdir) / f"{name}_s{seed}"
    done = workdir / "results.json"
    if done.is_file():
        return json.loads(done.read_text())
    if name.startswith("npz-"):
        results = run_npz(args, name, seed, workdir)
        done.write_text(json.dumps(results, indent=2, default=common._default))
        return results
    argv = ["--data", args.data, "--preset", args.preset, "--workdir", str(workdir), "--seed", str(seed),
            "--overwrite", "--no-progress", "--no-figures", *setting_flags(name)]
    if args.set:
        argv += ["--set", *args.set]
    t0 = time.perf_counter()
    results = hmdm_experiment.main(argv)
    if results.get("stopped_early"):
        raise KeyboardInterrupt(f"{name} seed {seed} was stopped: the table stops here, its finished cells are kept")
    results["wall_seconds"] = time.perf_counter() - t0
    done.write_text(json.dumps(results, indent=2, default=common._default))
    return results


def run_mixture(args, seed: int) -> dict | None:
    """The diffusion mixture on the training pool of ``seed``, scored on the held-out pool (the frames of both
    sequence sets); None for an npz source, whose frames have no pools."""
    if args.no_mixture or args.data.startswith("npz:"):
        return None
    workdir = Path(args.workdir) / f"mixture_s{seed}"
    done = workdir / "results.json"
    if done.is_file():
        return json.loads(done.read_text())
    return mixture_experiment.main(["--data", args.data, "--preset", args.preset, "--workdir", str(workdir),
                                    "--seed", str(seed), "--heldout-fraction", "0.3", "--overwrite",
                                    "--no-progress", "--no-figures"])


def row(name: str, seed: int, r: dict, mixture: dict | None = None) -> dict:
    b = r.get("baselines", {})
    pick = lambda key: (b.get(key) or {}).get("accuracy")
    chosen = (r.get("decisions") or {}).get("restarts")
    return {"setting": name, "seed": seed, "heldout": r.get("heldout_accuracy"), "A_mae": r.get("A_mae"),
            "framewise": r.get("heldout_framewise_accuracy"), "gaussian_hmm": pick("gaussian_hmm"),
            "ghmm_best_pca": pick("gaussian_hmm_best_pca_by_labels"), "gmm": pick("gmm"), "kmeans": pick("kmeans"),
            "mixture": None if mixture is None else mixture.get("heldout_accuracy"),
            "chosen_start": None if chosen is None else f"{chosen['chosen']}: {chosen['warm_start']}",
            "minutes": (r.get("train_seconds", 0) + r.get("eval_seconds", 0)) / 60}


def markdown(rows: list[dict]) -> str:
    fmt = lambda v, spec=".4f": "–" if v is None else format(v, spec)
    lines = ["| setting | seed | HMDM held-out | A error | HMDM frame-wise | tuned Gaussian HMM | GHMM, best PCA by labels "
             "| GMM | k-means | diffusion mixture | HMDM − GHMM | restart chosen | train + eval min |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lead = None if r["heldout"] is None or r["gaussian_hmm"] is None else r["heldout"] - r["gaussian_hmm"]
        lines.append(f"| {r['setting']} | {r['seed']} | {fmt(r['heldout'])} | {fmt(r['A_mae'])} | {fmt(r['framewise'])} "
                     f"| {fmt(r['gaussian_hmm'])} | {fmt(r['ghmm_best_pca'])} | {fmt(r['gmm'])} | {fmt(r['kmeans'])} "
                     f"| {fmt(r.get('mixture'))} | {fmt(lead, '+.4f')} | {r.get('chosen_start') or '–'} "
                     f"| {fmt(r['minutes'], '.1f')} |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.workdir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    cells = [(name, seed) for name in args.settings for seed in args.seeds]
    for name, seed in cells:
        try:
            rows.append(row(name, seed, run_one(args, name, seed), run_mixture(args, seed)))
        except KeyboardInterrupt as stop:  # Ctrl-C/SIGTERM: the run saved its checkpoint; keep the finished cells
            print(f"stopped: {stop}" if str(stop) else "stopped", flush=True)
            break
        (out / "generalisation.md").write_text(f"# HMDM generalisation ({args.data}, preset {args.preset})\n\n"
                                               f"{markdown(rows)}\n")
        (out / "generalisation.json").write_text(json.dumps(rows, indent=2))
    print("\n" + markdown(rows))
    return rows


if __name__ == "__main__":
    common.main_of(main)()
