#!/usr/bin/env python
"""Train a hidden Markov diffusion model (HMDM) and decode held-out sequences.

Image sources (digits, idx:DIR, tfds:NAME) are turned into Markov sequences: the labelled images are split
into disjoint train and held-out pools, label paths are drawn from (uniform π, A) and every frame gets a
pool image of its label. ``npz:PATH`` sequences are used as given (a held-out fraction is set aside).
Training is unsupervised: labels are used only for evaluation, except a random fraction F of labelled
training frames (``--observed-labels F``) that is clamped in training.

Example (the README's main job: 7.5 minutes measured on an otherwise idle 2-core CPU):
  python experiments/hmdm.py --data digits --preset cpu-small --workdir runs/demo
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax
import jax.numpy as jnp
import numpy as np

import common
from hmdm_jax import data as hdata
from hmdm_jax import gaussian_hmm, matching, metrics, sampling
from hmdm_jax import run


def parse_args(argv=None):
    p = common.base_parser(__doc__)
    p.add_argument("--num-sequences", type=int, default=200, help="training sequences (image sources)")
    p.add_argument("--heldout-sequences", type=int, default=100, help="held-out sequences")
    p.add_argument("--length", type=int, default=30, help="frames per sequence (image sources)")
    p.add_argument("--transition", default="cyclic",
                   help="A of the generated sequences: cyclic (0.8 to the next class), sticky, dirichlet or a .npy path")
    p.add_argument("--stay", type=float, default=0.8, help="the 0.8 of cyclic/sticky")
    p.add_argument("--heldout-fraction", type=float, default=0.3, help="images (or npz sequences) held out")
    return p.parse_args(argv)


def make_sequences(*, source: str, seed: int, num_classes: int | None = None, num_sequences: int = 200,
                   heldout_sequences: int = 100, length: int = 30, transition: str = "cyclic", stay: float = 0.8,
                   heldout_fraction: float = 0.3, classes: str | None = None):
    """(train SequenceDataset, held-out SequenceDataset, true A or None); the keywords are the flags, and
    the run's ``config.data`` record holds them, so ``evaluate.py`` rebuilds the same data."""
    if source.startswith("npz:"):
        if classes is not None:
            raise ValueError("--classes selects classes of an image source; npz: sequences are used as given")
        seqs = hdata.load_sequences_npz(source[4:], num_classes=num_classes)
        n_held = max(1, int(round(heldout_fraction * len(seqs.images))))
        perm = np.random.default_rng(seed).permutation(len(seqs.images))
        take = lambda idx: hdata.take(seqs, idx)
        return take(perm[n_held:]), take(perm[:n_held]), None
    images = common.load_images(source, classes)
    k = images.num_classes
    if k < 2:
        raise ValueError(f"{source} has no labels: Markov sequences need labelled images (or use npz: sequences)")
    pools = hdata.split_images(images, heldout_fraction, seed)
    A = hdata.transition_matrix(transition, k, stay=stay, rng=seed)
    train = hdata.markov_sequences([seed, 1], pools.train, None, A, num_sequences, length)
    held = hdata.markov_sequences([seed, 2], pools.heldout, None, A, heldout_sequences, length)
    return train, held, A


SEQUENCE_FLAGS = ("num_sequences", "heldout_sequences", "length", "transition", "stay", "heldout_fraction", "classes")


def sequences_from_args(args):
    """:func:`make_sequences` with this script's flags (also used by ablations.py)."""
    return make_sequences(source=args.data, seed=args.seed, num_classes=args.num_classes,
                          **{name: getattr(args, name) for name in SEQUENCE_FLAGS})


def to_train_data(seqs, observed) -> run.TrainData:
    return run.TrainData(seqs.images, seqs.labels, observed, seqs.mask)


def main(argv=None):
    args = parse_args(argv)
    workdir = Path(args.workdir)
    common.check_workdir(workdir)
    train_seqs, held_seqs, true_A = sequences_from_args(args)
    k = train_seqs.num_classes if args.num_classes is None else args.num_classes
    if k < 1:
        common.fail("cannot infer K from unlabelled data: pass --num-classes")
    observed = common.observed_mask(train_seqs.labels, args.observed_labels, args.seed, train_seqs.mask)
    config = common.build_config(
        args, "hmdm", k, train_seqs.images.shape[2:], source=args.data, num_sequences=len(train_seqs.images),
        heldout_sequences=len(held_seqs.images), length=int(train_seqs.images.shape[1]),
        transition=args.transition, stay=args.stay, heldout_fraction=args.heldout_fraction,
        observed_labels=args.observed_labels, classes=args.classes,
    )
    common.print_config(config)
    train_data, held_data = to_train_data(train_seqs, observed), to_train_data(held_seqs, np.zeros_like(observed[:0]))
    with common.Timer() as timer:
        result = run.train(config, train_data, workdir, heldout=held_data, resume=args.resume, overwrite=args.overwrite,
                           true_A=true_A,
                              progress=not args.no_progress)
    config = result.config  # as trained (the scoring band may have been chosen)
    if result.stopped_early:
        return common.stopped(workdir, result)
    with common.Timer() as eval_timer:
        estimator, num_t = run.evaluation.final_decoding(config)
        ev = run.evaluate(config, result.parts, result.state, train_data, held_data, num_t=num_t,
                          estimator=estimator, true_A=true_A)
        # the same network's emissions without the chain (uniform π and A): a frame-wise diffusion classifier
        flat = jnp.full_like(result.state.log_A, -np.log(k))
        framewise_state = result.state.replace(log_pi=flat[0], log_A=flat)
        framewise = run.predict_states(config, result.parts, framewise_state, held_data.images, held_data.mask,
                                       num_t=num_t, estimator=estimator)["states"]
        ev["heldout_framewise_accuracy"] = run.score_states(held_data.labels, framewise, k).get("accuracy")
    learned_A = np.exp(np.asarray(result.state.log_A))
    results = {
        "model": "hmdm", "data": args.data, "seed": args.seed, "steps": int(result.state.step),
        "train_seconds": timer.seconds, "eval_seconds": eval_timer.seconds, "final_num_t": num_t,
        **{key: v for key, v in ev.items() if key != "heldout_states"},
        "A_learned": learned_A.round(4), "A_true": true_A,
        "decisions": result.decisions,  # what the run decided without labels: band, restarts
    }
    results["baselines"] = baselines(train_seqs, held_seqs, k, args.seed)
    common.write_results(workdir, results)
    print(f"\nheld-out Viterbi accuracy: {ev.get('heldout_accuracy', float('nan')):.4f} (Hungarian), "
          f"{ev.get('heldout_accuracy_train_matching', float('nan')):.4f} (matching learned on training labels)")
    if "A_mae" in ev:
        print(f"A mean absolute error (after matching): {ev['A_mae']:.4f}")
    if ev.get("heldout_framewise_accuracy") is not None:
        print(f"frame-wise (the same emissions without the chain): {ev['heldout_framewise_accuracy']:.4f}")
    print("class usage:", " ".join(f"{u:.3f}" for u in ev["class_usage"]))
    print("learned A (rows: from state, columns: to state):")
    print(np.array2string(learned_A, precision=2, suppress_small=True, max_line_width=200))
    b = results["baselines"]
    print(f"baselines (held-out): Gaussian HMM {b['gaussian_hmm']['accuracy']:.4f} (PCA-{b['gaussian_hmm']['pca_dim']}, "
          f"chosen by held-out likelihood; {b['gaussian_hmm_best_pca_by_labels']['accuracy']:.4f} at the best "
          f"PCA-{b['gaussian_hmm_best_pca_by_labels']['pca_dim']} chosen with labels), k-means {b['kmeans']['accuracy']:.4f}")
    if not args.no_figures:
        figures(workdir, config, result, ev, held_seqs, true_A)
    return results


def baselines(train_seqs, held_seqs, k, seed) -> dict:
    """k-means and a GMM on frames, and a Gaussian-emission HMM on the sequences, on the same split."""
    flat = lambda s: s.images.reshape(s.images.shape[:2] + (-1,))
    tr_frames, tr_labels = flat(train_seqs)[train_seqs.mask], train_seqs.labels[train_seqs.mask]
    te_frames, te_labels = flat(held_seqs)[held_seqs.mask], held_seqs.labels[held_seqs.mask]
    out = {
        "kmeans": metrics.kmeans_baseline(tr_frames, tr_labels, te_frames, te_labels, k, seed=seed),
        "gmm": metrics.gmm_baseline(tr_frames, tr_labels, te_frames, te_labels, k, seed=seed),
        "gaussian_hmm": metrics.gaussian_hmm_baseline(
            flat(train_seqs), train_seqs.mask, flat(held_seqs), held_seqs.mask, held_seqs.labels, k, seed=seed,
            train_labels=train_seqs.labels),
    }
    # An upper bound on the classical pipeline, for reference only: the Gaussian HMM at the PCA dimension
    # whose *held-out accuracy* is best (labels used), beside the label-free choice above.
    fixed = [metrics.gaussian_hmm_baseline(flat(train_seqs), train_seqs.mask, flat(held_seqs), held_seqs.mask,
                                           held_seqs.labels, k, seed=seed, pca_dim=d)
             for d in gaussian_hmm.DEFAULT_PCA_DIMS if d != out["gaussian_hmm"]["pca_dim"]]
    out["gaussian_hmm_best_pca_by_labels"] = max(fixed + [out["gaussian_hmm"]], key=lambda r: r["accuracy"])
    keep = ("accuracy", "accuracy_train_matching", "ari", "nmi", "wall_time_s", "pca_dim")
    return {name: {key: v for key, v in r.items() if key in keep} for name, r in out.items()}


def figures(workdir: Path, config, result, ev, held_seqs, true_A) -> None:
    """Learned vs true A, confusion matrix, training curves, samples per class, reconstructions."""
    fig_dir = workdir / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    state, parts = result.state, result.parts
    k = config.em.num_classes
    mapping = ev.get("matching")
    learned_A = np.exp(np.asarray(state.log_A))
    metrics.plot_transition_matrices(learned_A, true_A, fig_dir / "transition_matrix.png",
                                     mapping=None if mapping is None else np.asarray(mapping))
    if "heldout_states" in ev:
        true, pred = held_seqs.labels.reshape(-1), ev["heldout_states"].reshape(-1)
        metrics.plot_confusion(matching.confusion_matrix(true, pred, k, k), fig_dir / "confusion.png")
    records = [r for r in common.read_metrics(workdir) if "loss" in r]
    if records:
        metrics.plot_training_curves(records, ["loss"], fig_dir / "training_curves.png")
    event = tuple(config.event_shape)
    if len(event) == 3:
        key = jax.random.PRNGKey(config.seed + 99)
        per_class = 8
        classes = np.repeat(np.arange(k, dtype=np.int32), per_class)
        samples = sampling.ancestral_sample(key, parts.eps_fn, state.ema_params, parts.schedule, classes, event)
        metrics.plot_samples_per_class(np.asarray(samples).reshape((k, per_class) + event), fig_dir / "samples_per_class.png")
        originals = held_seqs.images[0][: min(8, held_seqs.images.shape[1])]
        states = np.maximum(ev["heldout_states"][0][: len(originals)], 0).astype(np.int32) if "heldout_states" in ev \
            else np.zeros(len(originals), np.int32)
        T = parts.schedule.num_steps
        recon = {t: np.asarray(sampling.reconstruct(jax.random.fold_in(key, t), parts.eps_fn, state.ema_params,
                                                    parts.schedule, originals, t, states))
                 for t in (T // 10, T // 4, T // 2, 3 * T // 4)}
        metrics.plot_reconstructions(originals, recon, fig_dir / "reconstructions.png")
    print(f"figures in {fig_dir}")


if __name__ == "__main__":
    common.main_of(main)()
