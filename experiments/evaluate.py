#!/usr/bin/env python
"""Evaluate a trained run (mixture or HMDM): accuracy, NLL in bits/dim, FID and figures.

A long script on purpose: one section per metric of the paper (accuracy, NLL, FID, figures), each built
on the library (``run.evaluation``, ``metrics``) rather than re-implementing it.

The model type, the data and the seed come from the run's saved config: the data are rebuilt exactly
as the training script built them (``experiments/hmdm.py``'s ``make_sequences`` for the HMDM, the whole
image source for the mixture). Writes ``WORKDIR/evaluation.json`` and PNGs in ``WORKDIR/figures``.

Accuracy
  HMDM: Viterbi decoding of the held-out sequences; mixture: clustering of all images (the paper's
  setting). Reported with the Hungarian matching learned on the scored data ("accuracy"), with the
  state→label matching saved in the checkpoint (or, when the run saved none, learned now on at most 64
  training sequences / images: "accuracy_train_matching", see "matching_source"), and ARI/NMI.
NLL (bits/dim)
  An upper bound from the variational bound with the discretized (256-bin) decoder, per class
  ELBO_k(y) from ``emission.log_emission(estimator="elbo", decoder="discretized")`` on a grid of G
  t-terms (``--nll-num-t G``, 0 = the full T-term bound). Mixture: −log Σ_k π_k exp(ELBO_k(y));
  HMDM: the forward algorithm over ELBO emissions. On at most ``--nll-max-items`` held-out sequences
  (HMDM) or images (mixture: the data set, which is also its training set). G and the counts are recorded.
FID
  1-channel frames (digits 8×8, MNIST/Fashion 28×28): a *domain FID* on the 128-d features of a small
  CNN trained here on the training split; it ranks models of this project and is NOT comparable with
  Inception FID or published numbers. 3-channel frames: FID-InceptionV3 with ``--inception-weights``
  (pytorch-fid weights converted by ``hmdm_jax.metrics.inception``); without them FID is skipped.
  Samples: classes drawn from π (mixture) or generated Markov sequences of states (HMDM, π and A), then
  images by the ancestral sampler (or DDIM); the record holds sample count, sampler, steps and EMA.
Figures
  samples per class, reconstructions at several noise levels, confusion matrix, learned vs true A
  (HMDM), training curves from metrics.jsonl.

Example:
  python experiments/evaluate.py --workdir runs/demo
  python experiments/evaluate.py --workdir runs/demo --sampler ddim --sampling-steps 100 --nll-num-t 0
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
import hmdm as hmdm_experiment  # experiments/hmdm.py: the sequence construction of training
from hmdm_jax import checkpoint, emission, matching, metrics, sampling
from hmdm_jax import run

DEFAULT_NLL_ITEMS = {"hmdm": 20, "mixture": 500}
FIGURE_SAMPLES_PER_CLASS = 8
DIGITS_NLL_NOTE = ("scikit-learn's 8x8 digits have 17 grey levels, not 256: the 256-bin decoder scores boxes of "
                   "width 2/255 around each value, so the number bounds a probability at 8-bit resolution; it "
                   "compares runs on these data, not with 8-bit image NLLs such as MNIST's")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="the training run's directory (holds checkpoints/)")
    p.add_argument("--step", type=common.at_least(0), default=None, help="checkpoint step (default: latest)")
    p.add_argument("--seed", type=common.at_least(0), default=0, help="seed of the evaluation draws (emissions, samples)")
    g = p.add_argument_group("accuracy")
    g.add_argument("--num-t", type=common.at_least(1), default=None, help="t-draws per frame for decoding (default: the run's final_num_t)")
    g.add_argument("--estimator", default=None, choices=emission.ESTIMATORS,
                   help="emission estimator for decoding (default: the run's loop.final_estimator, else the training one)")
    g.add_argument("--batch-size", type=common.at_least(1), default=None, help="sequences (images) per decoding call")
    g.add_argument("--choose-temperature", action="store_true",
                   help="HMDM: choose the final decoding's temperature now, as evaluation.choose_temperature does at "
                        "the end of training (for a run trained without it; a run that chose one keeps its own)")
    g.add_argument("--accuracy-max-items", type=common.at_least(1), default=None,
                   help="decode at most this many held-out sequences (HMDM) / images (mixture) (default: all)")
    g = p.add_argument_group("NLL")
    g.add_argument("--nll-num-t", type=int, default=100,
                   help="G, ELBO terms on a grid of 1..T (default 100; 0 = the full T-term bound)")
    g.add_argument("--nll-max-items", type=common.at_least(1), default=None,
                   help=f"sequences (HMDM, default {DEFAULT_NLL_ITEMS['hmdm']}) or images (mixture, default "
                        f"{DEFAULT_NLL_ITEMS['mixture']}) whose NLL is evaluated")
    g.add_argument("--nll-chunk", type=int, default=64, help="frames per ELBO call (bounds memory; default 64)")
    g.add_argument("--no-nll", action="store_true", help="skip the NLL")
    g = p.add_argument_group("FID and samples")
    g.add_argument("--num-samples", type=int, default=500, help="generated images for FID (default 500)")
    g.add_argument("--sampler", default="ancestral", choices=sampling.SAMPLERS, help="ancestral (DDPM, T steps) or ddim")
    g.add_argument("--sampling-steps", type=int, default=None, help="DDIM steps S (required by --sampler ddim)")
    g.add_argument("--guidance-weight", type=float, default=0.0,
                   help="classifier-free guidance weight ω of the samples (default 0: the plain conditional model); "
                        "needs a run trained with em.labels.dropout > 0, which trains the null class")
    g.add_argument("--sample-batch", type=int, default=500, help="frames generated per sampler call (default 500)")
    g.add_argument("--no-ema", action="store_true", help="sample and score NLL with the raw parameters instead of the EMA")
    g.add_argument("--inception-weights", default=None,
                   help="FID-InceptionV3 weights file (3-channel data; without it FID is skipped)")
    g.add_argument("--classifier-steps", type=int, default=1000,
                   help="training steps of the digit CNN of the domain FID (1-channel data; default 1000)")
    g.add_argument("--fid-real-max", type=int, default=10000, help="real training frames used for FID statistics")
    g.add_argument("--no-fid", action="store_true", help="skip FID")
    p.add_argument("--recon-levels", default="0.1,0.25,0.5,0.75",
                   help="noise levels of the reconstruction figure, as fractions of T (default 0.1,0.25,0.5,0.75)")
    p.add_argument("--no-figures", action="store_true", help="skip figures")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if args.sampler == "ddim" and not args.sampling_steps:
        p.error("--sampler ddim needs --sampling-steps S")
    if args.sampler == "ancestral" and args.sampling_steps:
        p.error("--sampling-steps applies to --sampler ddim only (the ancestral sampler takes all T steps)")
    for name in ("num_samples", "sample_batch", "nll_chunk", "classifier_steps", "fid_real_max"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.num_samples < 2:
        p.error("--num-samples must be >= 2 (FID needs a covariance)")
    try:
        args.recon_levels = [float(v) for v in args.recon_levels.split(",") if v.strip()]
    except ValueError:
        p.error(f"--recon-levels must be comma-separated fractions of T, got {args.recon_levels!r}")
    if not args.recon_levels or not all(0.0 < v <= 1.0 for v in args.recon_levels):
        p.error("--recon-levels must be fractions in (0, 1]")
    if args.nll_num_t < 0 or args.nll_num_t == 1:
        p.error("--nll-num-t must be 0 (full bound) or >= 2 (the decoder term plus KL terms)")
    return args


# --------------------------------------------------------------------------------------------------
# The run's data, rebuilt from its saved config


class RunData(NamedTuple):
    """The data of a run as its training script built them.

    ``train``/``heldout`` are TrainData (HMDM: sequences; mixture: all images in ``train``, no held-out);
    ``true_A`` the transition matrix of generated sequences (None otherwise); ``notes`` caveats.
    """

    train: run.TrainData
    heldout: run.TrainData | None
    true_A: np.ndarray | None
    num_data_classes: int
    notes: list


def rebuild_data(config: run.RunConfig, workdir: Path) -> RunData:
    record = dict(config.data)
    source = record.get("source")
    if source is None:
        common.fail(f"the config saved in {workdir} records no data source (config.data = {record}); cannot rebuild the data")
    notes: list[str] = []
    try:
        if config.model_type == "hmdm":
            return _rebuild_sequences(config, workdir, record, notes)
        return _rebuild_images(config, record, notes)
    except (ValueError, FileNotFoundError, ImportError) as e:
        common.fail(f"cannot rebuild the data of {workdir} from its config (source {source!r}): {e}")


def _rebuild_sequences(config, workdir, record, notes) -> RunData:
    given = {name: record[name] for name in hmdm_experiment.SEQUENCE_FLAGS if record.get(name) is not None}
    missing = [key for key in ("stay", "heldout_fraction") if key not in given]
    if missing and not str(record["source"]).startswith("npz:"):
        notes.append(f"config.data does not record {', '.join(missing)}: rebuilt with experiments/hmdm.py's defaults")
    train_seqs, held_seqs, true_A = hmdm_experiment.make_sequences(source=str(record["source"]), seed=config.seed,
                                                                   num_classes=config.num_classes, **given)
    if "num_sequences" in record and len(train_seqs.images) != int(record["num_sequences"]):
        notes.append(f"rebuilt {len(train_seqs.images)} training sequences, the config records {record['num_sequences']}")
    observed = common.observed_mask(train_seqs.labels, float(record.get("observed_labels", 0.0)), config.seed,
                                    train_seqs.mask)
    train = hmdm_experiment.to_train_data(train_seqs, observed)
    held = hmdm_experiment.to_train_data(held_seqs, np.zeros(held_seqs.labels.shape, bool))
    return RunData(train, held, true_A, max(train_seqs.num_classes, config.em.num_classes), notes)


def _rebuild_images(config, record, notes) -> RunData:
    images = common.load_images(str(record["source"]), record.get("classes"))
    if "num_images" in record and len(images.images) != int(record["num_images"]):
        notes.append(f"the source now has {len(images.images)} images, the config records {record['num_images']}")
    observed = common.observed_mask(images.labels, float(record.get("observed_labels", 0.0)), config.seed)
    train = run.TrainData(images.images, images.labels, observed)
    return RunData(train, None, None, max(images.num_classes, config.em.num_classes), notes)


def _check_event_shape(config, data: RunData, workdir) -> None:
    hmdm = config.model_type == "hmdm"
    event = data.train.images.shape[2:] if hmdm else data.train.images.shape[1:]
    if tuple(event) != tuple(config.event_shape):
        common.fail(f"the rebuilt data of {workdir} have frames of shape {tuple(event)}, the model was trained "
                    f"on {tuple(config.event_shape)}")


# --------------------------------------------------------------------------------------------------
# Accuracy


def full_mapping(mapping, k: int) -> np.ndarray | None:
    """A state→label matching of length K: entries for states the matching does not cover are −1."""
    if mapping is None:
        return None
    mapping = np.asarray(mapping, np.int64).reshape(-1)[:k]
    return np.concatenate([mapping, np.full(k - len(mapping), -1, np.int64)])


def choose_temperature(config, parts, state, data: RunData):
    """``(config, state)``: the run's config decoding at the temperature ``evaluation.choose_temperature`` would
    have chosen, and its state with the chain refitted with it."""
    if config.model_type != "hmdm":
        common.fail("--choose-temperature balances the frames against the HMDM's chain: the mixture has none")
    if config.evaluation.temperature is not None:
        print(f"decoding temperature {config.evaluation.temperature:.3g}: the run's own choice", flush=True)
        return config, state
    sequences = data.train
    temperature, log_pi, log_A, fits = run.evaluation.choose_decoding(config, parts, state, sequences)
    print(f"decoding temperature {temperature:.3g} (the E-step's: {config.em.temperature.final:.3g}), π and A refitted "
          f"with it; the chain adds {fits.max():.3f} nats per frame on "
          f"{min(len(sequences.images), run.evaluation.DECODING_FIT_SEQUENCES)} sequences", flush=True)
    return (config.with_decisions({"decoding_temperature": temperature}),
            run.evaluation.with_chain(state, log_pi, log_A))


def accuracy_section(args, config, parts, state, metadata, data: RunData) -> tuple[dict, dict]:
    """(results, internals): Hungarian and saved-matching accuracy, ARI/NMI, class usage, A; the internals
    (predicted states, the labels they are scored against, the matching) feed the figures and FID."""
    k = config.num_classes
    hmdm = config.model_type == "hmdm"
    final_estimator, final_num_t = run.evaluation.final_decoding(config)
    estimator = args.estimator or final_estimator
    num_t = final_num_t if args.num_t is None else args.num_t
    batch = config.evaluation.batch_size * (1 if hmdm else 16) if args.batch_size is None else args.batch_size
    scored = data.heldout if hmdm else data.train
    n = len(scored.images) if args.accuracy_max_items is None else min(args.accuracy_max_items, len(scored.images))
    key = jax.random.PRNGKey(args.seed + 7)
    decode = lambda d, m, key: run.predict_states(config, parts, state, d.images[:m], None if d.mask is None else d.mask[:m],
                                                  num_t=num_t, batch_size=batch, key=key, estimator=estimator,
                                                  progress=not args.no_progress)["states"]
    pred, true = decode(scored, n, key), scored.labels[:n]
    mapping, source = full_mapping(metadata.get("matching") if isinstance(metadata, dict) else None, k), "checkpoint metadata"
    if mapping is None and np.any(data.train.labels >= 0):
        m = min(64, len(data.train.images))
        mapping = run.score_states(data.train.labels[:m], decode(data.train, m, jax.random.fold_in(key, 1)), k).get("matching")
        mapping = None if mapping is None else np.asarray(mapping)
        source = f"learned now on {m} training {'sequences' if hmdm else 'images'} (the checkpoint saved none)"
    observed = None
    if not hmdm and float(dict(config.data).get("observed_labels", 0.0)) > 0:
        observed = data.train.observed[:n]
    learned_A = np.exp(np.asarray(state.log_A))
    true_A = data.true_A if hmdm and data.true_A is not None and data.true_A.shape == learned_A.shape else None
    scores = run.score_states(true, pred, k, mapping=mapping, learned_A=learned_A if hmdm else None, true_A=true_A)
    out: dict[str, Any] = {
        "evaluated_on": (f"{n} held-out sequences ({int(scored.mask[:n].sum())} frames), Viterbi paths" if hmdm
                         else f"{n} images (all the data: the mixture clusters its training set)"),
        "decode_num_t": num_t, "decode_estimator": estimator, "class_usage": scores["class_usage"],
    }
    out["class_usage_min"] = float(min(out["class_usage"]))
    hungarian = None
    if "accuracy" in scores:
        hungarian = np.asarray(scores["matching"])
        out.update({name: scores[name] for name in ("accuracy", "ari", "nmi", "accuracy_train_matching", "A_mae")
                    if name in scores})
        if mapping is not None:
            out["matching"], out["matching_source"] = mapping.tolist(), source
        if observed is not None:
            # observed labels clamp state k to label k in training: the identity matching is the right one
            identity = run.score_states(true, pred, k, mapping=np.arange(k), observed=observed)
            if "masked_label_accuracy" in identity:
                out["masked_label_accuracy"] = identity["masked_label_accuracy"]
                out["masked_label_accuracy_hungarian"] = run.score_states(true, pred, k, observed=observed)[
                    "masked_label_accuracy"]
            else:
                out["note"] = "every label was observed in training: there is no masked-label accuracy"
    else:
        out["note"] = "the data have no labels: accuracy, ARI and NMI are not defined"
    if hmdm:
        out["A_learned"] = learned_A.round(4).tolist()
        if data.true_A is not None:
            out["A_true"] = np.asarray(data.true_A).round(4).tolist()
    else:
        out["pi"] = np.exp(np.asarray(state.log_pi)).round(4).tolist()
    return out, {"pred": pred, "true": true, "hungarian": hungarian, "mapping": mapping, "n": n}


# --------------------------------------------------------------------------------------------------
# NLL


def _frame_keys(key, num_frames: int) -> jax.Array:
    return jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.arange(num_frames))


def elbo_per_class(parts, params, frames: np.ndarray, key, num_classes: int, num_t: int | None, chunk: int,
                   progress: bool = False) -> np.ndarray:
    """ELBO_k(y) in nats, ``[M, K]``, for ``frames [M, *event]``, in fixed-size jitted chunks.

    Frame i uses the key ``fold_in(key, i)``, so the result does not depend on the chunk size.
    """
    fn = jax.jit(lambda p, y, keys: emission.log_emission(
        parts.eps_fn, p, parts.schedule, y, keys, num_classes, estimator="elbo", num_t=num_t, decoder="discretized"))
    keys = _frame_keys(key, len(frames))
    chunk = min(chunk, len(frames))
    out = []
    for start in tqdm(range(0, len(frames), chunk), disable=not progress, desc="ELBO", unit="chunk"):
        y, kk = frames[start:start + chunk], keys[start:start + chunk]
        m = len(y)
        if m < chunk:  # pad to the compiled size, then trim
            y = np.concatenate([y, np.repeat(y[-1:], chunk - m, axis=0)])
            kk = jnp.concatenate([kk, jnp.repeat(kk[-1:], chunk - m, axis=0)])
        out.append(np.asarray(fn(params, jnp.asarray(y), kk))[:m])
    return np.concatenate(out)


def nll_section(args, config, parts, state, data: RunData) -> dict:
    k = config.em.num_classes
    hmdm = config.model_type == "hmdm"
    T = parts.schedule.num_steps
    grid = None if args.nll_num_t == 0 or args.nll_num_t >= T else args.nll_num_t
    params = state.params if args.no_ema else state.ema_params
    items = DEFAULT_NLL_ITEMS[config.model_type] if args.nll_max_items is None else args.nll_max_items
    key = jax.random.PRNGKey(args.seed + 11)
    dims = int(np.prod(config.event_shape))
    if hmdm:
        src = data.heldout
        n = min(items, len(src.images))
        images, mask = src.images[:n], src.mask[:n]
        length = images.shape[1]
        frames = images.reshape((n * length,) + images.shape[2:])
        elbo = elbo_per_class(parts, params, frames, key, k, grid, args.nll_chunk, not args.no_progress)
        elbo = elbo.reshape(n, length, k)
        per_seq = metrics.hmdm_nll_bits_per_dim(state.log_pi, state.log_A, elbo, jnp.asarray(mask), dims)
        bpd = float(metrics.dataset_bits_per_dim(per_seq, mask.sum(1)))
        count = {"sequences": n, "frames": int(mask.sum())}
        split = "held-out sequences"
    else:
        n = min(items, len(data.train.images))
        frames = data.train.images[:n]
        elbo = elbo_per_class(parts, params, frames, key, k, grid, args.nll_chunk, not args.no_progress)
        per_image = metrics.mixture_nll_bits_per_dim(state.log_pi, elbo, dims)
        bpd = float(metrics.dataset_bits_per_dim(per_image))
        count = {"images": n, "frames": n}
        split = "the data set (the mixture's training images)"
    return {
        "bits_per_dim": bpd,
        "bound": "upper bound on -log2 p(y) / D: variational bound (ELBO) with the discretized 256-bin decoder",
        "elbo_num_t": T if grid is None else grid,
        "elbo_full_bound": grid is None,
        "elbo_grid": "all T terms" if grid is None else f"t = 1 decoder term + {grid - 1} midpoint KL terms (emission.elbo_grid)",
        "diffusion_steps": T,
        "split": split,
        **count,
        "num_dims": dims,
        "ema": not args.no_ema,
        **({"note": DIGITS_NLL_NOTE} if dict(config.data).get("source") == "digits" else {}),
    }


# --------------------------------------------------------------------------------------------------
# Samples and FID


def sample_classes(config, state, num: int, length: int | None, key) -> np.ndarray:
    """``num`` classes to generate: drawn from π (mixture), or the states of Markov chains of the data's
    length with π and A, flattened (HMDM; the sequence generation of ``sampling.generate_sequences``)."""
    if config.model_type == "hmdm":
        keys = jax.random.split(key, -(-num // length))
        chains = [np.asarray(sampling.sample_markov_states(k, state.log_pi, state.log_A, length)) for k in keys]
        return np.concatenate(chains)[:num].astype(np.int32)
    return np.asarray(sampling.sample_classes(key, state.log_pi, num)).astype(np.int32)


def draw_images(args, config, parts, params, classes: np.ndarray, batch: int, key) -> np.ndarray:
    """Images of ``classes`` by the chosen sampler, in calls of exactly ``batch`` frames (the last one padded,
    then trimmed), so that every call reuses one compilation."""
    event = tuple(config.event_shape)
    out = []
    for i, start in enumerate(range(0, len(classes), batch)):
        c = np.asarray(classes[start:start + batch], np.int32)
        m = len(c)
        c = np.concatenate([c, np.zeros(batch - m, np.int32)])
        key_i = jax.random.fold_in(key, i)
        guidance = dict(guidance_weight=args.guidance_weight, null_class=config.num_classes)
        if args.sampler == "ddim":
            imgs = sampling.ddim_sample(key_i, parts.eps_fn, params, parts.schedule, c, event,
                                        num_steps=int(args.sampling_steps), **guidance)
        else:
            imgs = sampling.ancestral_sample(key_i, parts.eps_fn, params, parts.schedule, c, event, **guidance)
        out.append(np.asarray(imgs)[:m])
    return np.concatenate(out)


def _valid_frames(td: run.TrainData) -> tuple[np.ndarray, np.ndarray]:
    if td.mask is None:
        return td.images, td.labels
    return td.images[td.mask], td.labels[td.mask]


def fid_section(args, config, parts, state, data: RunData, acc_internals: dict) -> dict:
    event = tuple(config.event_shape)
    if len(event) != 3:
        return {"skipped": f"FID needs image frames [H, W, C]; this run's frames have shape {event}"}
    channels = event[-1]
    real, real_labels = _valid_frames(data.train)
    record_extra: dict[str, Any] = {}
    classifier = None
    if channels == 1:
        if not np.any(real_labels >= 0):
            return {"skipped": "the domain FID of 1-channel data needs a labelled training split to train its classifier"}
        held = _valid_frames(data.heldout) if data.heldout is not None else (None, None)
        t0 = time.perf_counter()
        classifier = metrics.train_digit_classifier(
            jax.random.PRNGKey(args.seed + 5), real, real_labels, data.num_data_classes, steps=args.classifier_steps,
            test_images=held[0], test_labels=held[1])
        extractor = metrics.classifier_feature_extractor(classifier.params)
        feature_net = ("digit-cnn-128 (domain FID: a small CNN trained on this run's training split; "
                       "NOT comparable with Inception FID)")
        record_extra.update(classifier_steps=args.classifier_steps, classifier_seconds=time.perf_counter() - t0,
                            classifier_heldout_accuracy=classifier.test_accuracy)
    elif channels == 3:
        if not args.inception_weights:
            msg = ("FID skipped: 3-channel data need FID-InceptionV3 weights; pass --inception-weights PATH "
                   "(pytorch-fid's pt_inception weights converted by hmdm_jax.metrics.inception)")
            print(msg, flush=True)
            return {"skipped": msg}
        try:
            extractor = metrics.inception_feature_extractor(args.inception_weights)
        except (OSError, ValueError) as e:
            common.fail(f"cannot load Inception weights from {args.inception_weights}: {e}")
        feature_net = "inception-v3-pytorch-fid-pool3"
    else:
        return {"skipped": f"no FID feature network for {channels}-channel frames"}
    length = data.train.images.shape[1] if config.model_type == "hmdm" else None
    t0 = time.perf_counter()
    key_classes, key_images = jax.random.split(jax.random.PRNGKey(args.seed + 99))
    classes = sample_classes(config, state, args.num_samples, length, key_classes)
    params = state.params if args.no_ema else state.ema_params
    samples = draw_images(args, config, parts, params, classes, min(args.sample_batch, args.num_samples), key_images)
    sample_seconds = time.perf_counter() - t0
    rng = np.random.default_rng(args.seed)
    if len(real) > args.fid_real_max:
        real = real[np.sort(rng.choice(len(real), args.fid_real_max, replace=False))]
    real_f = metrics.extract_features(extractor, real)
    fake_f = metrics.extract_features(extractor, samples)
    steps = args.sampling_steps if args.sampler == "ddim" else parts.schedule.num_steps
    sampler_name = "ddim (eta 0)" if args.sampler == "ddim" else "ddpm-ancestral"
    rec = metrics.fid_record(metrics.fid_from_features(real_f, fake_f), num_samples=len(samples), sampler=sampler_name,
                             steps=int(steps), ema=not args.no_ema, feature_net=feature_net)
    rec["guidance_weight"] = float(args.guidance_weight)
    rec.update(record_extra)
    rec.update(real_images=len(real), real_split="training split (valid frames)" if length else "the data set",
               classes_from="generated Markov state sequences (pi, A)" if length else "classes drawn from pi",
               sampling_seconds=sample_seconds, sample_class_usage=matching.class_usage(classes, config.num_classes).tolist())
    mapping = acc_internals.get("mapping")
    if classifier is not None and mapping is not None:
        # Does a sample of state s look like the label matched to s? (the classifier judges)
        logits = np.concatenate([np.asarray(metrics.classifier_logits(classifier.params, samples[i:i + 1000]))
                                 for i in range(0, len(samples), 1000)])
        target = mapping[classes]
        rec["sample_label_agreement"] = float(np.mean(logits.argmax(-1) == target))
    return rec


# --------------------------------------------------------------------------------------------------
# Figures


def _training_records(workdir: Path) -> tuple[list, list]:
    records = common.read_metrics(workdir)
    losses = [r for r in records if "loss" in r]
    evals = [{"step": r["step"], **{k: v for k, v in r["eval"].items() if isinstance(v, (int, float))}}
             for r in records if isinstance(r.get("eval"), dict)]
    return losses, evals


def figures_section(args, workdir: Path, config, parts, state, data: RunData, acc: dict, internals: dict) -> list:
    fig_dir = workdir / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    k = config.em.num_classes
    event = tuple(config.event_shape)
    written: list[str] = []
    params = state.params if args.no_ema else state.ema_params
    key = jax.random.PRNGKey(args.seed + 123)
    if len(event) == 3:
        classes = np.repeat(np.arange(k, dtype=np.int32), FIGURE_SAMPLES_PER_CLASS)
        # The FID's batch size when it is smaller: the same compiled sampler serves both.
        batch = min(len(classes), args.sample_batch, args.num_samples)
        samples = draw_images(args, config, parts, params, classes, batch, key)
        names = None
        if internals.get("mapping") is not None:
            names = [f"k={s}→{m}" if m >= 0 else f"k={s}" for s, m in enumerate(internals["mapping"])]
        written.append(metrics.plot_samples_per_class(
            np.asarray(samples).reshape((k, FIGURE_SAMPLES_PER_CLASS) + event), fig_dir / "samples_per_class.png",
            class_names=names))
        # Reconstructions: the first frames scored for accuracy, denoised under their decoded states.
        pred = internals["pred"]
        if config.model_type == "hmdm":
            m = min(8, int(data.heldout.mask[0].sum()))
            originals, states = data.heldout.images[0][:m], pred[0][:m]
        else:
            m = min(8, len(data.train.images))
            originals, states = data.train.images[:m], pred[:m]
        states = np.maximum(states, 0).astype(np.int32)
        T = parts.schedule.num_steps
        recon = {}
        for t in sorted({min(T, max(1, int(round(f * T)))) for f in args.recon_levels}):
            kwargs = {"sampler": "ddim", "num_steps": min(int(args.sampling_steps), t)} if args.sampler == "ddim" else {}
            recon[t] = np.asarray(sampling.reconstruct(jax.random.fold_in(key, t), parts.eps_fn, params, parts.schedule,
                                                       originals, t, states, **kwargs))
        written.append(metrics.plot_reconstructions(originals, recon, fig_dir / "reconstructions.png",
                                                    title="reconstructions from z_t under the decoded states"))
    if "accuracy" in acc:
        true, pred = internals["true"].reshape(-1), internals["pred"].reshape(-1)
        conf = matching.confusion_matrix(true, pred, data.num_data_classes, k)
        hungarian = internals["hungarian"]
        # Columns reordered so that the state matched to label c is column c (unmatched states last).
        order = np.argsort(np.where(hungarian >= 0, hungarian, k + np.arange(k)), kind="stable")
        written.append(metrics.plot_confusion(conf[:, order], fig_dir / "confusion.png",
                                              title="confusion (states ordered by the Hungarian matching)"))
    if config.model_type == "hmdm":
        learned = np.exp(np.asarray(state.log_A))
        true_A = data.true_A if data.true_A is not None and data.true_A.shape == learned.shape else None
        mapping = internals.get("mapping")
        if mapping is None:
            mapping = internals.get("hungarian")
        if true_A is None:
            mapping = None
        written.append(metrics.plot_transition_matrices(learned, true_A, fig_dir / "transition_matrix.png",
                                                        mapping=mapping))
    losses, evals = _training_records(workdir)
    if losses:
        keys = [key for key in ("loss", "posterior_entropy", "temperature", "frames_per_sec") if any(key in r for r in losses)]
        written.append(metrics.plot_training_curves(losses, keys, fig_dir / "training_curves.png"))
    if evals:
        keys = [key for key in ("heldout_accuracy", "heldout_accuracy_train_matching", "train_accuracy", "A_mae",
                                "heldout_ari", "heldout_nmi") if any(key in r for r in evals)]
        if keys:
            written.append(metrics.plot_training_curves(evals, keys, fig_dir / "evaluation_curves.png"))
    return [str(p) for p in written]


# --------------------------------------------------------------------------------------------------


def uncommitted(tree):
    """``tree`` with every array copied to an uncommitted device array.

    Orbax restores arrays committed to a device; jitted functions called with them compile separately
    from (and do not share the compilation cache with) the same calls on freshly initialised arrays.
    """
    return jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), tree)


def _load(workdir: Path, step):
    if not workdir.is_dir():
        common.fail(f"no such run directory: {workdir}")
    try:
        config, parts, state, metadata = run.load_run(workdir, step)
        return config, parts, uncommitted(state), metadata
    except checkpoint.CheckpointNotFoundError as e:
        common.fail(f"no checkpoint to evaluate in {workdir}: {e}")
    except checkpoint.CheckpointError as e:
        common.fail(f"cannot load the run in {workdir}: {e}")


def main(argv=None):
    args = parse_args(argv)
    workdir = Path(args.workdir)
    config, parts, state, metadata = _load(workdir, args.step)
    if args.guidance_weight and not args.no_fid and config.em.labels.dropout == 0:
        raise ValueError(f"--guidance-weight {args.guidance_weight} samples from the null class, which this run never "
                         "trained (em.labels.dropout = 0); train with --set em.labels.dropout=0.1 or sample with ω = 0")
    step = int(state.step)
    print(f"evaluating {workdir}: {config.model_type}, K={config.em.num_classes}, step {step}, data "
          f"{dict(config.data).get('source')}", flush=True)
    data = rebuild_data(config, workdir)
    _check_event_shape(config, data, workdir)
    if args.choose_temperature:
        config, state = choose_temperature(config, parts, state, data)
    seconds: dict[str, float] = {}
    result: dict[str, Any] = {
        "workdir": str(workdir), "model": config.model_type, "step": step, "num_classes": config.em.num_classes,
        "event_shape": list(config.event_shape), "seed": config.seed, "data": dict(config.data),
        "diffusion_steps": parts.schedule.num_steps, "notes": data.notes,
    }
    t0 = time.perf_counter()
    acc, internals = accuracy_section(args, config, parts, state, metadata, data)
    seconds["accuracy"] = time.perf_counter() - t0
    result["accuracy"] = acc
    if not args.no_nll:
        t0 = time.perf_counter()
        result["nll"] = nll_section(args, config, parts, state, data)
        seconds["nll"] = time.perf_counter() - t0
    if not args.no_fid:
        t0 = time.perf_counter()
        result["fid"] = fid_section(args, config, parts, state, data, internals)
        seconds["fid"] = time.perf_counter() - t0
    if not args.no_figures:
        t0 = time.perf_counter()
        result["figures"] = figures_section(args, workdir, config, parts, state, data, acc, internals)
        seconds["figures"] = time.perf_counter() - t0
    result["seconds"] = seconds
    path = workdir / "evaluation.json"
    path.write_text(json.dumps(result, indent=2, default=common._default))
    print_summary(result)
    print(f"wrote {path}" + (f"; figures in {workdir / 'figures'}" if result.get("figures") else ""), flush=True)
    return result


def print_summary(r: dict) -> None:
    a = r["accuracy"]
    what = "held-out Viterbi accuracy" if r["model"] == "hmdm" else "clustering accuracy (all images)"
    if "accuracy" in a:
        line = f"{what}: {a['accuracy']:.4f} (Hungarian)"
        if "accuracy_train_matching" in a:
            line += f", {a['accuracy_train_matching']:.4f} (matching from {a['matching_source']})"
        print(line + f"  ARI {a['ari']:.3f}  NMI {a['nmi']:.3f}")
    if "masked_label_accuracy" in a:
        print(f"accuracy on the labels masked in training: {a['masked_label_accuracy']:.4f}")
    if "A_mae" in a:
        print(f"A mean absolute error (after matching): {a['A_mae']:.4f}")
    print("class usage:", " ".join(f"{u:.3f}" for u in a["class_usage"]))
    if "nll" in r:
        n = r["nll"]
        grid = "full bound" if n["elbo_full_bound"] else f"{n['elbo_num_t']}-term grid"
        where = f"{n['sequences']} sequences, {n['frames']} frames" if "sequences" in n else f"{n['images']} images"
        print(f"NLL: {n['bits_per_dim']:.4f} bits/dim (upper bound; ELBO {grid} of T={n['diffusion_steps']}, "
              f"discretized decoder, {where})")
    if "fid" in r:
        f = r["fid"]
        if "skipped" in f:
            print(f"FID: skipped ({f['skipped']})")
        else:
            print(f"FID: {f['fid']:.4f} ({f['feature_net'].split(' (')[0]}, {f['num_samples']} samples, {f['sampler']} "
                  f"{f['steps']} steps, {'EMA' if f['ema'] else 'raw'} parameters)")
    for note in r.get("notes", []):
        print(f"note: {note}")


if __name__ == "__main__":
    common.main_of(main)()
