#!/usr/bin/env python
"""Train a mixture of diffusion models on single images and report clustering accuracy.

Unsupervised by default: labels are used only for evaluation, except a random fraction F of the
labelled images (``--observed-labels F``) that is clamped in training; then the accuracy on the other
(masked) labels is reported too, and the ``cpu-small`` preset adds the label loss on the labelled images
(``em.labels.loss_weight=0.1``) and trains 6,000 steps. All images are clustered (the paper's setting) unless
``--heldout-fraction F`` keeps a stratified fraction apart: then the model is trained on the rest and the
held-out images are classified too. With the same ``--seed`` and fraction as ``experiments/hmdm.py`` the
pools are those of its Markov sequences (the frame-wise mixture on the same split). ``npz:PATH`` holds
``images [N, H, W(, C)]`` and optional ``labels [N]``.

Example:
  python experiments/mixture.py --data digits --preset cpu-small --workdir runs/mixture
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax
import numpy as np

import common
from hmdm_jax import data as hdata
from hmdm_jax import matching, metrics, sampling
from hmdm_jax import run


def main(argv=None):
    p = common.base_parser(__doc__)
    p.add_argument("--heldout-fraction", type=float, default=0.0,
                   help="train on the rest, also report accuracy on this stratified held-out fraction (default 0)")
    args = p.parse_args(argv)
    workdir = Path(args.workdir)
    common.check_workdir(workdir)
    images = common.load_images(args.data, args.classes)
    heldout = None
    if args.heldout_fraction > 0:
        pools = hdata.split_images(images, args.heldout_fraction, args.seed)
        images, heldout = pools.train, pools.heldout
        if len(images.images) == 0:
            common.fail(f"--heldout-fraction {args.heldout_fraction} holds out every image: nothing is left to train on")
    k = images.num_classes if args.num_classes is None else args.num_classes
    if k < 1:
        common.fail("cannot infer K from unlabelled data: pass --num-classes")
    observed = common.observed_mask(images.labels, args.observed_labels, args.seed)
    config = common.build_config(args, "mixture", k, images.images.shape[1:], source=args.data,
                                 num_images=len(images.images), observed_labels=args.observed_labels,
                                 heldout_fraction=args.heldout_fraction, classes=args.classes)
    common.print_config(config)
    data = run.TrainData(images.images, images.labels, observed)
    with common.Timer() as timer:
        result = run.train(config, data, workdir, resume=args.resume, overwrite=args.overwrite,
                           progress=not args.no_progress)
    config = result.config  # as trained (the scoring band may have been chosen)
    if result.stopped_early:
        return common.stopped(workdir, result)
    estimator, num_t = run.evaluation.final_decoding(config)
    decode = lambda x: run.predict_states(config, result.parts, result.state, x, num_t=num_t, estimator=estimator,
                                          batch_size=256)["states"]
    pred = decode(images.images)
    results = {"model": "mixture", "data": args.data, "seed": args.seed, "steps": int(result.state.step),
               "train_seconds": timer.seconds, "final_num_t": num_t, "final_estimator": estimator,
               "pi": np.exp(np.asarray(result.state.log_pi)), "decisions": result.decisions}
    results.update(run.score_states(images.labels, pred, k, observed=observed if observed.any() else None))
    if (images.labels >= 0).any():
        flat = images.images.reshape(len(images.images), -1)
        results["baselines"] = {
            name: {key: v for key, v in fn(flat, images.labels, flat, images.labels, k, seed=args.seed).items()
                   if key in ("accuracy", "ari", "nmi", "wall_time_s")}
            for name, fn in (("kmeans", metrics.kmeans_baseline), ("gmm", metrics.gmm_baseline))}
    if heldout is not None and (heldout.labels >= 0).any():
        held = run.score_states(heldout.labels, decode(heldout.images), k, mapping=results.get("matching"))
        results["heldout_accuracy"] = held["accuracy"]
        if "accuracy_train_matching" in held:  # the state -> label matching learned on the training images
            results["heldout_accuracy_train_matching"] = held["accuracy_train_matching"]
    common.write_results(workdir, results)
    if "heldout_accuracy" in results:
        print(f"held-out accuracy: {results['heldout_accuracy']:.4f} (Hungarian)")
    if "accuracy" in results:
        print(f"\nclustering accuracy (Hungarian): {results['accuracy']:.4f}  ARI {results['ari']:.3f}  NMI {results['nmi']:.3f}")
        if "masked_label_accuracy" in results:
            print(f"accuracy on the masked labels: {results['masked_label_accuracy']:.4f}")
        b = results["baselines"]
        print(f"baselines: k-means {b['kmeans']['accuracy']:.4f}, GMM {b['gmm']['accuracy']:.4f}")
    print("class usage:", " ".join(f"{u:.3f}" for u in results["class_usage"]))
    if not args.no_figures and len(config.event_shape) == 3:
        fig_dir = workdir / "figures"
        fig_dir.mkdir(parents=True, exist_ok=True)
        per_class, event = 8, tuple(config.event_shape)
        classes = np.repeat(np.arange(k, dtype=np.int32), per_class)
        samples = sampling.ancestral_sample(jax.random.PRNGKey(args.seed + 99), result.parts.eps_fn,
                                            result.state.ema_params, result.parts.schedule, classes, event)
        metrics.plot_samples_per_class(np.asarray(samples).reshape((k, per_class) + event), fig_dir / "samples_per_class.png")
        if (images.labels >= 0).any():
            metrics.plot_confusion(matching.confusion_matrix(images.labels, pred, k, k), fig_dir / "confusion.png")
        print(f"figures in {fig_dir}")
    return results


if __name__ == "__main__":
    common.main_of(main)()
