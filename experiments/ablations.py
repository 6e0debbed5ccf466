#!/usr/bin/env python
"""The paper's two ablations, in one table: (a) the posterior (E-step) estimator, (b) the initialisation.

Over 400 lines: the rows, their caching and the table; training and evaluation are the library's.

(a) Posterior estimator. Every row trains the same model on the same data with the same k-means warm
    start and steps, changing only the E-step:
      paper                  EMConfig.paper(K): one random t, the sampled Gaussian density, scale 1,
                             π (and A) re-estimated: Algorithms 1/3 of the draft taken literally.
      paper_last_decoder     the paper's E-step, always the last decoder (t = 1).
      paper_multi_t          the paper's E-step averaged over 8 t-draws.
      paper_elbo             the paper's E-step with a 10-term grid ELBO as the emission.
      untempered             the default scorer (ε-MSE, the preset's draws, mid band) with temperature 1.
      default                the project's default: the same, tempered (temperature 0.15).
      default_no_warm_start  the default without the k-means warm start (random initialisation).
(b) Initialisation.
      pretrained             a conditional diffusion trained with ALL true labels (the supervised
                             reference and the starting point of fine-tuning): the same training loop
                             with every label clamped, π and A estimated by its M-step from the labels.
      finetune               EM (default E-step, labels hidden, no warm start) started from the
                             pretrained ε-network: compare with default_no_warm_start (random init).

Default data: the HMDM on the embedded digits' Markov sequences, built exactly as experiments/hmdm.py
builds them (same flags and defaults); ``--model mixture`` clusters the images instead. Accuracy is
held-out Viterbi accuracy (HMDM) or clustering accuracy on all images (mixture), Hungarian-matched.
Each row is a normal run in WORKDIR/<row>/ (config, metrics.jsonl, checkpoints, row.json), so
``experiments/evaluate.py --workdir WORKDIR/<row>`` evaluates it further. Rows whose row.json matches
the current config are reused (``--rerun`` forces them); an interrupted row resumes from its checkpoint.
The table goes to stdout, WORKDIR/ablations.md and WORKDIR/ablations.json.

``--set`` overrides apply to every row (before the row's own E-step settings, which win). Periodic
evaluation is off by default (``loop.eval_every=0``): each row is evaluated once at the end.

Example (CPU: a few minutes per row at the default 1500 steps; the elbo row is slower):
  python experiments/ablations.py --workdir runs/ablations
  python experiments/ablations.py --workdir runs/abl --steps 300 --rows default,finetune
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
import hmdm as hmdm_experiment  # experiments/hmdm.py: the sequence construction
from hmdm_jax import checkpoint, em, emission
from hmdm_jax import data as hdata
from hmdm_jax import run

MULTI_T_DRAWS = 8
ELBO_GRID = 10
UNTEMPERED = 1.0


class Row(NamedTuple):
    name: str
    ablation: str  # "a", "b" or "a, b"
    description: str
    overrides: Callable[[int], list]  # K -> config overrides of this row
    kind: str = "em"  # "em" | "pretrain" | "finetune"


def em_overrides(target: em.EMConfig) -> list[str]:
    """The ``em.*`` overrides that turn any EMConfig with ``target.num_classes`` into ``target``."""
    def leaves(obj, prefix):
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                yield from leaves(value, f"{prefix}{f.name}.")
            elif f.name != "num_classes":
                yield f"{prefix}{f.name}={json.dumps(value)}"
    return list(leaves(target, "em."))


def _paper(**scoring) -> Callable[[int], list]:
    return lambda k: em_overrides(em.EMConfig.paper(k).replace(scoring=scoring))


ROWS = [
    Row("paper", "a", "EMConfig.paper: random t, sampled density, scale 1, pi learned", _paper()),
    Row("paper_last_decoder", "a", "paper, always the last decoder (t = 1)", _paper(estimator="last_decoder")),
    Row("paper_multi_t", "a", f"paper, mean of {MULTI_T_DRAWS} t-draws (multi_t)",
        _paper(estimator="multi_t", num_t=MULTI_T_DRAWS)),
    Row("paper_elbo", "a", f"paper, {ELBO_GRID}-term grid ELBO as emission",
        _paper(estimator="elbo", num_t=ELBO_GRID, t_range=None)),
    Row("untempered", "a", f"eps_mse (preset draws, band 0.3-0.6 T), temperature {UNTEMPERED:g}",
        lambda k: [f"em.temperature.final={UNTEMPERED}"]),
    Row("default", "a", "default: eps_mse (preset draws: 1 for HMDM), band 0.3-0.6 T, temperature 0.15", lambda k: []),
    Row("default_no_warm_start", "a, b", "default, no k-means warm start (random init)",
        lambda k: ["warm_start.method=none"]),
    Row("pretrained", "b", "supervised: all true labels (reference; start of finetune)",
        lambda k: ["warm_start.method=none", "reseed.every=0", "em.priors.learn_pi=true"], "pretrain"),
    Row("finetune", "b", "default EM from the pretrained network, labels hidden, no warm start",
        # no warm start: nothing to choose the band from, and no restarts from other starts
        lambda k: ["warm_start.method=none", "band.choose=false", "restarts.count=1"], "finetune"),
]
ROW_NAMES = [r.name for r in ROWS]


def parse_args(argv=None):
    h = hmdm_experiment.parse_args(["--workdir", "-"])  # the sequence flags' defaults of experiments/hmdm.py
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="runs/ablations", help="output directory (default runs/ablations)")
    p.add_argument("--model", default="hmdm", choices=run.config.MODEL_TYPES, help="hmdm (default) or mixture")
    p.add_argument("--seed", type=int, default=0, help="seed of data, initialisation and draws (all rows)")
    p.add_argument("--steps", type=int, default=1500, help="training steps of every row (default 1500)")
    p.add_argument("--pretrain-steps", type=int, default=None, help="supervised pretraining steps (default: --steps)")
    p.add_argument("--preset", default="cpu-small", choices=("cpu-small", "gpu", "tpu"))
    p.add_argument("--rows", nargs="+", default=None, metavar="ROW",
                   help="rows to run (names, comma or space separated; default all): " + ", ".join(ROW_NAMES))
    p.add_argument("--list-rows", action="store_true", help="print the rows and exit")
    p.add_argument("--rerun", action="store_true", help="retrain rows even when WORKDIR/<row>/row.json matches")
    p.add_argument("--set", nargs="*", default=[], metavar="SECTION.FIELD=VALUE",
                   help="config overrides for every row (the rows' own E-step settings win)")
    p.add_argument("--data", default="digits", help=hdata.SOURCE_HELP)
    p.add_argument("--num-classes", type=int, default=None, help="K (default: the number of classes of the data)")
    p.add_argument("--classes", default=None, metavar="C1,C2,...", help="keep only these classes of the image source")
    g = p.add_argument_group("HMDM sequences (as in experiments/hmdm.py)")
    g.add_argument("--num-sequences", type=int, default=h.num_sequences)
    g.add_argument("--heldout-sequences", type=int, default=h.heldout_sequences)
    g.add_argument("--length", type=int, default=h.length)
    g.add_argument("--transition", default=h.transition)
    g.add_argument("--stay", type=float, default=h.stay)
    g.add_argument("--heldout-fraction", type=float, default=h.heldout_fraction)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if args.list_rows:
        return args
    names = ROW_NAMES if args.rows is None else [n for item in args.rows for n in item.split(",") if n]
    unknown = [n for n in names if n not in ROW_NAMES]
    if unknown:
        p.error(f"unknown rows {unknown}; choose from {ROW_NAMES}")
    args.row_names = [n for n in ROW_NAMES if n in names]  # canonical order (pretrained before finetune)
    if args.steps < 1:
        p.error("--steps must be >= 1")
    args.pretrain_steps = args.steps if args.pretrain_steps is None else args.pretrain_steps
    return args


# --------------------------------------------------------------------------------------------------
# Data


class Data(NamedTuple):
    train: run.TrainData
    heldout: run.TrainData | None
    true_A: np.ndarray | None
    num_classes: int
    event_shape: tuple
    record: dict


def build_data(args) -> Data:
    if args.model == "hmdm":
        train_seqs, held_seqs, true_A = hmdm_experiment.sequences_from_args(args)
        k = args.num_classes or train_seqs.num_classes
        hidden = np.zeros(train_seqs.labels.shape, bool)
        record = dict(source=args.data, num_sequences=len(train_seqs.images), heldout_sequences=len(held_seqs.images),
                      length=int(train_seqs.images.shape[1]), transition=args.transition, stay=args.stay,
                      classes=args.classes,
                      heldout_fraction=args.heldout_fraction, observed_labels=0.0)
        return Data(hmdm_experiment.to_train_data(train_seqs, hidden),
                    hmdm_experiment.to_train_data(held_seqs, np.zeros(held_seqs.labels.shape, bool)),
                    true_A, k, tuple(train_seqs.images.shape[2:]), record)
    images = common.load_images(args.data, args.classes)
    k = args.num_classes or images.num_classes
    record = dict(source=args.data, num_images=len(images.images), observed_labels=0.0, classes=args.classes)
    return Data(run.TrainData(images.images, images.labels, np.zeros(images.labels.shape, bool)), None, None, k,
                tuple(images.images.shape[1:]), record)


# --------------------------------------------------------------------------------------------------
# Configs


def base_config(args, data: Data, notes: list) -> run.RunConfig:
    config = run.preset(args.preset, args.model, data.num_classes, data.event_shape, **data.record)
    config = _apply(config, [f"seed={args.seed}", f"loop.train_steps={args.steps}", "evaluation.every=0"] + list(args.set))
    if config.warm_start.active and config.warm_start.steps >= config.loop.train_steps:
        short = max(1, config.loop.train_steps // 3)
        notes.append(f"warm_start.steps={config.warm_start.steps} >= {config.loop.train_steps} steps: "
                     f"the warm start is shortened to {short} steps (a third of the run)")
        config = _apply(config, [f"warm_start.steps={short}"])
    return config


def row_config(base: run.RunConfig, row: Row) -> run.RunConfig:
    return _apply(base, row.overrides(base.em.num_classes))


def _apply(config, overrides):
    try:
        return run.apply_overrides(config, overrides)
    except ValueError as e:
        common.fail(str(e))


def _json(obj) -> Any:
    return json.loads(json.dumps(obj, default=common._default))


def e_step_summary(config: run.RunConfig, row: Row) -> str:
    if row.kind == "pretrain":
        return "supervised (all labels)"
    e = config.em
    parts = [_scoring_summary(e.scoring)]
    parts.append(f"temp {e.temperature.final:g}")
    parts.append("pi learned" if e.priors.learn_pi else "pi fixed")
    parts.append("init: pretrained" if row.kind == "finetune" else
                 (f"{config.warm_start.method} warm start" if config.warm_start.active else "no warm start"))
    return ", ".join(parts)


# --------------------------------------------------------------------------------------------------
# Evaluation of one row


def common_scorer(config: em.EMConfig, num_t: int) -> em.EMConfig:
    """The scorer every row is decoded with: the default E-step scorer (eps_mse, mid band, temperature
    0.15) with ``num_t`` draws, so that the rows compare what was learned, not how it is scored."""
    return config.replace(scoring=em.Scoring(num_t=num_t), temperature=em.Temperature())


def own_scorer(config: em.EMConfig, num_t: int) -> em.EMConfig:
    """The row's own E-step estimator with ``num_t`` draws where it takes draws (``em.evaluation_config``);
    elbo keeps its training grid."""
    grid = emission.get_estimator(config.scoring.estimator).grid
    return em.evaluation_config(config, num_t=None if grid else num_t)


def _scoring_summary(s: em.Scoring) -> str:
    """"eps_mse, 1 draw, band 0.3-0.6 T": the estimator, its draws (or grid) and band, from its registry entry."""
    est = emission.get_estimator(s.estimator)
    parts = [s.estimator]
    if est.grid:
        parts.append(f"grid {s.num_t}")
    elif not est.single_draw or est.several_draws is not None:
        parts.append(f"{s.num_t} draw{'s' if s.num_t != 1 else ''}")
    if est.takes_band and s.t_range is not None:
        parts.append(f"band {s.t_range[0]:g}-{s.t_range[1]:g} T")
    return ", ".join(parts)


def scorer_summary(e: em.EMConfig) -> str:
    return f"{_scoring_summary(e.scoring)}, temperature {e.temperature.final:g}"


def _decode(config, parts, state, scorer: em.EMConfig, images, mask, key=None):
    cfg = dataclasses.replace(config, em=scorer)
    return run.predict_states(cfg, parts, state, images, mask, num_t=scorer.scoring.num_t, key=key)["states"]


def evaluate_row(config, parts, state, data: Data) -> dict:
    """Held-out Viterbi accuracy (HMDM) / clustering accuracy on all images (mixture), Hungarian-matched,
    with the common scorer (and with the row's own scorer), the accuracy with a matching learned on at
    most 64 training items, ARI/NMI, class usage."""
    k = config.num_classes
    hmdm = config.model_type == "hmdm"
    num_t = config.evaluation.final_num_t
    scored = data.heldout if hmdm else data.train
    common_em, own_em = common_scorer(config.em, num_t), own_scorer(config.em, num_t)
    pred = _decode(config, parts, state, common_em, scored.images, scored.mask)
    m = min(64, len(data.train.images))
    tr = _decode(config, parts, state, common_em, data.train.images[:m],
                 None if data.train.mask is None else data.train.mask[:m], jax.random.PRNGKey(config.seed + 8))
    mapping = np.asarray(run.score_states(data.train.labels[:m], tr, k)["matching"])
    learned = np.exp(np.asarray(state.log_A))
    scores = run.score_states(scored.labels, pred, k, mapping=mapping, learned_A=learned if hmdm else None,
                              true_A=data.true_A if hmdm and data.true_A is not None
                              and data.true_A.shape == learned.shape else None)
    out = {name: scores[name] for name in ("accuracy", "ari", "nmi", "class_usage", "accuracy_train_matching", "A_mae")
           if name in scores}
    out.update(class_usage_min=float(min(scores["class_usage"])), scorer=scorer_summary(common_em),
               own_scorer=scorer_summary(own_em), matching=mapping.tolist())
    own_pred = pred if own_em == common_em else _decode(config, parts, state, own_em, scored.images, scored.mask)
    out["accuracy_own_scorer"] = run.score_states(scored.labels, own_pred, k)["accuracy"]
    if hmdm:
        out["A_learned"] = learned.round(4).tolist()
    else:
        out["pi"] = np.exp(np.asarray(state.log_pi)).round(4).tolist()
    return out


# --------------------------------------------------------------------------------------------------
# Training of one row


def labelled(data: Data) -> Data:
    """The training data with every label observed: the supervised run clamps them all, so the loop's EM
    step is a conditional DDPM step and its M-step estimates π and A from the labels."""
    if not np.any(data.train.labels >= 0):
        common.fail("pretraining needs labelled training data")
    return data._replace(train=data.train._replace(observed=data.train.labels >= 0))


def _same_config(saved: dict | None, current: dict) -> bool:
    """Whether a row's saved config is the current one. Fields added to the config since it was saved
    take their defaults, so a row is not retrained just because the config class grew."""
    if saved is None:
        return False
    try:
        return _json(run.RunConfig.from_dict(saved).to_dict()) == current
    except (TypeError, ValueError, KeyError):
        return False


def run_row(args, row: Row, config: run.RunConfig, data: Data, workdir: Path, pretrained_params=None) -> dict:
    """Trains (or reuses) one row and evaluates it; returns its row record (also saved as row.json)."""
    row_dir = workdir / row.name
    config_json = _json(config.to_dict())
    saved = row_dir / "row.json"
    steps = args.pretrain_steps if row.kind == "pretrain" else config.loop.train_steps
    if saved.exists() and not args.rerun:
        old = json.loads(saved.read_text())
        if _same_config(old.get("config"), config_json) and old.get("steps") == steps and "results" in old \
                and (row.kind != "finetune" or old.get("pretrain_steps") == args.pretrain_steps):
            print(f"[{row.name}] reusing {saved}", flush=True)
            return old
    resume = False
    if row_dir.exists():
        same = (row_dir / "config.json").exists() and _same_config(json.loads((row_dir / "config.json").read_text()), config_json)
        if row.kind != "finetune" and same and not args.rerun and checkpoint.latest_step(row_dir / "checkpoints") is not None:
            resume = True
            print(f"[{row.name}] resuming from {row_dir / 'checkpoints'}", flush=True)
        else:
            shutil.rmtree(row_dir)
    print(f"[{row.name}] {row.description}: {steps} steps", flush=True)
    t0 = time.perf_counter()
    train_data = labelled(data).train if row.kind == "pretrain" else data.train
    if row.kind == "pretrain":
        config = _apply(config, [f"loop.train_steps={steps}"])
    result = run.train(config, train_data, row_dir, heldout=data.heldout, true_A=data.true_A, resume=resume,
                       progress=not args.no_progress, init_params=pretrained_params if row.kind == "finetune" else None)
    if result.stopped_early:  # Ctrl-C/SIGTERM: the row's checkpoint is saved; rerunning resumes it
        common.stopped(row_dir, result)
        raise SystemExit(0)
    state, parts, config = result.state, result.parts, result.config
    train_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    results = evaluate_row(config, parts, state, data)
    record = {
        "row": row.name, "ablation": row.ablation, "description": row.description, "e_step": e_step_summary(config, row),
        "overrides": row.overrides(config.em.num_classes), "steps": steps, "trained_steps": int(state.step),
        "train_seconds": train_seconds, "eval_seconds": time.perf_counter() - t0,
        "resumed": resume, "results": results, "config": config_json,
    }
    if row.kind == "finetune":
        record["pretrain_steps"] = args.pretrain_steps
    saved.write_text(json.dumps(record, indent=2, default=common._default))
    print(f"[{row.name}] accuracy {results['accuracy']:.4f} (Hungarian; own scorer {results['accuracy_own_scorer']:.4f}), min class usage "
          f"{results['class_usage_min']:.3f}, {train_seconds:.0f} s", flush=True)
    return _json(record)


# --------------------------------------------------------------------------------------------------
# Table


def _fmt(v, digits=4):
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return f"{v:.{digits}f}"


def markdown_table(records: list, model: str) -> str:
    acc_name = "held-out acc." if model == "hmdm" else "acc. (all images)"
    head = (f"| abl. | row | E-step / initialisation | {acc_name} | acc. (own scorer) | acc. (train matching) | "
            f"ARI | NMI | min class usage | train time (s) | steps |")
    lines = [head, "|" + "---|" * 11]
    for r in records:
        if "error" in r:
            error = r["error"].replace("|", "/").replace("\n", " ")
            lines.append(f"| {r['ablation']} | {r['row']} | {r.get('e_step', '')} | failed: {error} | | | | | | | |")
            continue
        res = r["results"]
        lines.append(
            f"| {r['ablation']} | {r['row']} | {r['e_step']} | {_fmt(res['accuracy'])} | "
            f"{_fmt(res.get('accuracy_own_scorer'))} | {_fmt(res.get('accuracy_train_matching'))} | "
            f"{_fmt(res.get('ari'), 3)} | {_fmt(res.get('nmi'), 3)} | {_fmt(res['class_usage_min'], 3)} | "
            f"{r['train_seconds']:.0f}{' (resumed)' if r.get('resumed') else ''} | {r['steps']} |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    if args.list_rows:
        for r in ROWS:
            print(f"{r.name:24s} ({r.ablation}) {r.description}")
        return None
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    data = build_data(args)
    if data.num_classes < 2:
        common.fail("the ablations need K >= 2 classes: pass --num-classes")
    notes: list[str] = []
    base = base_config(args, data, notes)
    for note in notes:
        print(f"note: {note}", flush=True)
    selected = [r for r in ROWS if r.name in args.row_names]
    if any(r.kind == "finetune" for r in selected) and not any(r.kind == "pretrain" for r in selected):
        selected.insert(0, next(r for r in ROWS if r.kind == "pretrain"))  # finetune needs it
        print("note: finetune needs the pretrained row; running (or reusing) it too", flush=True)
    records, pretrained_params = [], None
    t_all = time.perf_counter()
    for row in selected:
        config = row_config(base, row)
        try:
            if row.kind == "finetune":
                if pretrained_params is None:
                    raise RuntimeError("the pretrained row failed")
                record = run_row(args, row, config, data, workdir, pretrained_params)
            else:
                record = run_row(args, row, config, data, workdir)
            if row.kind == "pretrain":
                # The EMA parameters of the supervised run are the starting point of fine-tuning.
                _, _, state, _ = run.load_run(workdir / row.name)
                # Uncommitted copies: restored (committed) arrays would make the EM step compile anew.
                pretrained_params = jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), state.ema_params)
        except (Exception, SystemExit) as e:  # one failed row must not lose the others
            if isinstance(e, SystemExit) and e.code in (0, None):
                raise
            traceback.print_exc()
            record = {"row": row.name, "ablation": row.ablation, "description": row.description,
                      "e_step": e_step_summary(config, row), "error": f"{type(e).__name__}: {e}"}
        records.append(record)
    table = markdown_table(records, args.model)
    what = ("held-out Viterbi accuracy of the HMDM on digit Markov sequences" if args.model == "hmdm"
            else "clustering accuracy of the mixture on all images")
    header = (f"# Ablations ({args.model}, data {args.data}, seed {args.seed}, {args.steps} steps per row"
              f"{f', {args.pretrain_steps} pretraining steps' if any(r.kind == 'pretrain' for r in selected) else ''})\n\n"
              f"Accuracy: {what}, Hungarian-matched on the scored data. Every row is decoded with the same scorer "
              f"({scorer_summary(common_scorer(base.em, base.evaluation.final_num_t))}); \"own scorer\": decoded with the "
              f"row's E-step estimator instead (random_t averaged over the same draws = multi_t; last_decoder one draw; "
              f"elbo its grid); \"train matching\": the matching learned on (at most 64) training items. Min class "
              f"usage: the smallest fraction of decoded frames in one state (0 = an unused state). (b) compares "
              f"finetune with default_no_warm_start (random initialisation, no warm start); pretrained is the "
              f"supervised reference.\n")
    text = header + "\n" + table + "\n" + "".join(f"\nNote: {n}\n" for n in notes)
    (workdir / "ablations.md").write_text(text)
    summary = {"model": args.model, "data": args.data, "seed": args.seed, "steps": args.steps,
               "pretrain_steps": args.pretrain_steps, "preset": args.preset, "overrides": list(args.set),
               "data_record": data.record, "notes": notes, "seconds": time.perf_counter() - t_all,
               "rows": [{k: v for k, v in r.items() if k != "config"} for r in records], "table": table}
    (workdir / "ablations.json").write_text(json.dumps(summary, indent=2, default=common._default))
    print("\n" + table + "\n", flush=True)
    print(f"wrote {workdir / 'ablations.md'} and {workdir / 'ablations.json'}", flush=True)
    return summary


if __name__ == "__main__":
    common.main_of(main)()
