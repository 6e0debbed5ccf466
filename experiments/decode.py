#!/usr/bin/env python
"""Decode sequences (HMDM: Viterbi) or images (mixture) with the latest checkpoint of a run.

Input: for HMDM an .npz with ``images [N, n, H, W(, C)]``, optional ``lengths [N]`` and ``labels [N, n]``
(−1 unknown); for the mixture ``images [N, H, W(, C)]`` and optional ``labels [N]``. Output .npz:
``states`` (``[N, n]`` int32, −1 past each length; ``[N]`` for the mixture), ``log_joint [N]`` (HMDM),
``marginals [N, n, K]`` (HMDM; the class posterior ``[N, K]`` for the mixture), and ``labels`` (states
mapped through the state-to-label matching saved with the checkpoint) when one exists. Prints the
accuracy when the input has labels.

Example:
  python experiments/decode.py --workdir runs/demo --input held.npz --output decoded.npz --num-t 64
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
from hmdm_jax import data as hdata
from hmdm_jax import emission
from hmdm_jax import run


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="the training run's directory (holds checkpoints/)")
    p.add_argument("--input", required=True, help="input .npz")
    p.add_argument("--output", required=True, help="output .npz")
    p.add_argument("--estimator", default=None, choices=emission.ESTIMATORS,
                   help="emission estimator (default: the run's evaluation.final_estimator, else the training one)")
    p.add_argument("--num-t", type=common.at_least(1), default=None, help="t-draws per frame (default: the run's final_num_t)")
    p.add_argument("--batch-size", type=common.at_least(1), default=None, help="sequences (images) per jitted call")
    p.add_argument("--step", type=common.at_least(0), default=None, help="checkpoint step (default: latest)")
    p.add_argument("--seed", type=common.at_least(0), default=0, help="seed of the emission draws")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    output_dir = Path(args.output).resolve().parent
    if not output_dir.is_dir():
        common.fail(f"--output {args.output}: the folder {output_dir} does not exist")
    if Path(args.output).is_dir():
        common.fail(f"--output {args.output} is a folder; give the path of the .npz file to write")
    config, parts, state, metadata = run.load_run(args.workdir, args.step)
    state = jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), state)  # uncommitted: shares compilations
    k = config.em.num_classes
    hmdm = config.model_type == "hmdm"
    ds = hdata.load_sequences_npz(args.input, num_classes=k) if hmdm else hdata.load_images_npz(args.input, num_classes=k)
    event = ds.images.shape[2:] if hmdm else ds.images.shape[1:]
    if tuple(event) != tuple(config.event_shape):
        common.fail(f"input frames have shape {tuple(event)}, the model was trained on {tuple(config.event_shape)}")
    final_estimator, final_num_t = run.evaluation.final_decoding(config)
    num_t = final_num_t if args.num_t is None else args.num_t
    estimator = args.estimator or final_estimator
    batch = config.evaluation.batch_size * (1 if hmdm else 16) if args.batch_size is None else args.batch_size
    out = run.predict_states(config, parts, state, ds.images, ds.mask if hmdm else None, num_t=num_t,
                          batch_size=batch, key=jax.random.PRNGKey(args.seed), estimator=estimator,
                          progress=not args.no_progress)
    result = {"states": out["states"].astype(np.int32)}
    if hmdm:
        result.update(log_joint=out["log_joint"], marginals=out["marginals"])
    else:
        result["marginals"] = np.exp(out["log_posterior"])
    mapping = metadata.get("matching")
    if mapping is not None:
        # One entry per state; a matching that covers fewer states (states unused when it was learned)
        # leaves the rest without a label (−1).
        mapping = np.asarray(mapping, np.int64).reshape(-1)[:k]
        mapping = np.concatenate([mapping, np.full(k - len(mapping), -1, np.int64)])
        result["labels"] = np.where(result["states"] >= 0, mapping[np.maximum(result["states"], 0)], -1).astype(np.int32)
    with open(args.output, "wb") as handle:  # a file object: np.savez would append ".npz" to another name
        np.savez(handle, **result)
    print(f"wrote {args.output}: " + ", ".join(f"{n} {v.shape}" for n, v in result.items()))
    if np.any(ds.labels >= 0):
        scores = run.score_states(ds.labels, result["states"], k, mapping=mapping)
        line = f"accuracy (Hungarian on this input): {scores['accuracy']:.4f}"
        if mapping is not None:
            line += f"; with the saved matching: {scores['accuracy_train_matching']:.4f}"
        print(line)
    return result


if __name__ == "__main__":
    common.main_of(main)()
