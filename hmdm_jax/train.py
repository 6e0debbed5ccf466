"""The one training loop that every experiment uses, for both the mixture and HMDM.

A run is described by one frozen :class:`RunConfig` (printed, saved with every checkpoint, overridable
from the command line with ``--set section.field=value``) and trained by :func:`train` on in-memory
arrays. The loop: deterministic batches (a function of seed and step, so resume is exact), jitted steps
(optionally ``steps_per_call`` of them fused into one ``lax.scan``), an optional k-means warm start
(labels clamped for the first steps), periodic evaluation, ``metrics.jsonl``, a tqdm progress bar,
Orbax checkpoints every N steps, resume, and a clean stop on SIGTERM/Ctrl-C (save, then exit).
"""
from __future__ import annotations

import dataclasses
import json
import time
import typing
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from hmdm_jax import checkpoint, diffusion, em, emission, hmdm, mixture, models, parallel, warm_start
from hmdm_jax.metrics import accuracy as acc_metrics
from hmdm_jax.state import TrainState, create_train_state

MODEL_TYPES = ("hmdm", "mixture")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Adam with linear warm-up, global-norm clipping and an EMA of the parameters."""

    learning_rate: float = 1e-3
    warmup_steps: int = 200
    grad_clip: float = 1.0
    ema_decay: float = 0.995


@dataclasses.dataclass(frozen=True)
class DiffusionConfig:
    """The noise schedule (one object for training, scoring and sampling)."""

    schedule: str = "linear"
    num_steps: int = 1000


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """Length, batching, warm start, evaluation and checkpointing of the loop.

    Attributes:
      num_steps: optimizer steps.
      batch_size: frames (mixture) or sequences (HMDM) per step, global over all devices.
      warm_start: "kmeans" (clamp k-means cluster labels for ``warm_start_steps``; seeded by the class
        means of the observed labels when every class has some), "ward" (Ward's agglomerative clusters;
        ≤ 30k frames; the mixture's ``cpu-small`` preset uses it when the images fit) or "none".
      warm_start_steps: length of the warm start.
      steps_per_call: fuse this many steps into one jitted ``lax.scan`` (cuts dispatch on small models).
      log_every, eval_every, checkpoint_every: in steps (0 disables evaluation/checkpoints).
      keep_checkpoints: the last k checkpoints are kept.
      eval_num_t: t-draws per frame when decoding for evaluation during training.
      final_num_t: t-draws per frame (grid terms for "elbo") for the final evaluation.
      final_estimator: the emission estimator of the final evaluation and of ``decode.py``/``evaluate.py``
        (None: the training estimator). The mixture preset uses the grid ELBO ("elbo", 50 terms): a
        classification by the model's likelihood bound, label-free; on digits it scored 0.5–1.5 points above
        64 ε-MSE draws on 4 of 5 trained mixtures (RESULTS.md). HMDM keeps the tempered training scorer,
        which Viterbi needs (untempered ELBO emissions: 0.90 in the prototypes).
      eval_batch_size: sequences (or images) decoded per jitted call.
      reseed_every: every this many steps after the warm start, decode the training frames and re-seed
        dead states (0 disables): a state used by fewer than ``reseed_min_usage / K`` of the frames takes
        one half (2-means on the pixels) of the most used state's frames, clamped for ``reseed_steps``.
      reseed_min_usage: the dead-state threshold, as a fraction of the uniform usage 1/K.
      reseed_steps: how long the re-seeded assignment stays clamped.
      reseed_num_t: t-draws per frame when decoding for the re-seed check.
      hard_estep_every: every this many steps after the warm start, decode all training frames with
        ``hard_estep_num_t`` draws and clamp the decoded classes (observed labels kept) until the next
        one: a periodic full-data hard E-step between stretches of training on a fixed assignment
        (0 disables; the online stochastic E-step then runs on every batch). On the digits mixture it
        measured worse, with either scorer: it locks in the current errors (RESULTS.md).
      hard_estep_num_t: t-draws per frame (grid terms for "elbo") for that decoding.
      hard_estep_estimator: the emission estimator of that decoding (None: the training estimator).
      select_t_range: at the end of the warm start, replace ``em.t_range`` by the candidate band
        (``em.CANDIDATE_BANDS``) whose one-draw class decision best reproduces the warm-start assignment
        (:func:`em.select_t_range`; no labels). The choice is saved with the checkpoints. Off by default
        and for HMDM, where on the main job it chose a worse band (see :func:`em.select_t_range`); on in
        the mixture's ``cpu-small`` preset, where it measured better (0.846–0.865 vs 0.822–0.823).
      select_frames: training frames (a fixed random subset) scored for that choice.
      observed_batch_fraction: this fraction of every batch is drawn from the items (images, or sequences)
        with at least one observed label, the rest uniformly from all items as usual: labelled data
        weighted up, as in semi-supervised EM (Nigam et al., 2000). 0: plain uniform batches; without
        observed labels it has no effect. The mixture preset uses 0.5 (digits, 10 % labels: 0.932 on the
        masked labels vs 0.905 with uniform batches). With labels scattered over sequences nearly every
        sequence has one, so HMDM presets leave it at 0.
    """

    num_steps: int = 3000
    batch_size: int = 8
    warm_start: str = "kmeans"
    warm_start_steps: int = 500
    steps_per_call: int = 1
    log_every: int = 50
    eval_every: int = 1000
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    eval_num_t: int = 16
    final_num_t: int = 64
    final_estimator: str | None = None
    eval_batch_size: int = 16
    reseed_every: int = 500
    reseed_min_usage: float = 0.5
    reseed_steps: int = 250
    reseed_num_t: int = 4
    hard_estep_every: int = 0
    hard_estep_num_t: int = 16
    hard_estep_estimator: str | None = None
    select_t_range: bool = False
    select_frames: int = 2048
    observed_batch_fraction: float = 0.0

    def __post_init__(self):
        for name in ("final_estimator", "hard_estep_estimator"):
            value = getattr(self, name)
            if value is not None and value not in emission.ESTIMATORS:
                raise ValueError(f"{name} must be None or one of {emission.ESTIMATORS}, got {value!r}")
        if not 0.0 <= self.observed_batch_fraction < 1.0:
            raise ValueError(f"observed_batch_fraction must be in [0, 1), got {self.observed_batch_fraction}")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything that defines a run; the checkpoint's config.

    Attributes:
      model_type: "hmdm" or "mixture".
      network: the ε-network architecture.
      em: E-step, loss and M-step options (``num_classes`` is K).
      event_shape: the shape of one frame, e.g. (8, 8, 1).
      data: a free-form record of how the data were made (source, split, sequence settings).
    """

    model_type: str
    network: models.ModelConfig
    em: em.EMConfig
    event_shape: tuple[int, ...]
    optim: OptimConfig = OptimConfig()
    diffusion: DiffusionConfig = DiffusionConfig()
    loop: LoopConfig = LoopConfig()
    seed: int = 0
    data: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self):
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type must be one of {MODEL_TYPES}, got {self.model_type!r}")
        object.__setattr__(self, "event_shape", tuple(int(d) for d in self.event_shape))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        return _from_dict(cls, d)


def _from_dict(cls, d):
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in d:
            continue
        value, hint = d[f.name], hints[f.name]
        if dataclasses.is_dataclass(hint):
            value = _from_dict(hint, value)
        elif isinstance(value, list):
            value = _to_tuple(value)
        kwargs[f.name] = value
    return cls(**kwargs)


def _to_tuple(value):
    return tuple(_to_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def apply_overrides(config, overrides: list[str]):
    """``config`` with dotted overrides applied, e.g. ``["loop.num_steps=100", "em.temperature=0.2"]``.

    Values are parsed as JSON when possible (numbers, true/false, null, lists), else kept as strings.
    Unknown fields raise a ``ValueError`` that names them.
    """
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like section.field=value")
        path, raw = item.split("=", 1)
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        config = _replace_path(config, path.split("."), _to_tuple(value), path)
    return config


def _replace_path(obj, names, value, full):
    names_here = {f.name for f in dataclasses.fields(obj)}
    if names[0] not in names_here:
        raise ValueError(f"unknown config field {full!r}: {type(obj).__name__} has {sorted(names_here)}")
    if len(names) == 1:
        return dataclasses.replace(obj, **{names[0]: value})
    return dataclasses.replace(obj, **{names[0]: _replace_path(getattr(obj, names[0]), names[1:], value, full)})


def preset(name: str, model_type: str, num_classes: int, event_shape: tuple[int, ...], **data) -> RunConfig:
    """The named preset for a model type, K and frame shape.

    * ``cpu-small``: an MLP ε-network, minutes on a 2-core CPU (the README's main job).
    * ``gpu``: the U-Net sized for the frame shape, one GPU.
    * ``tpu``: the same U-Net with a larger global batch, for a pod slice.

    ``data`` is the record of where the frames came from, saved in the config (``source=...``,
    ``num_images=...``); ``observed_labels`` (the fraction of labels clamped in training) also turns on the
    mixture's label loss (``em.label_loss_weight = 0.1``) and 6,000 steps in ``cpu-small``, and
    ``num_images`` up to ``warm_start.MAX_WARD_FRAMES`` (or absent) gives the mixture Ward's warm start there.
    """
    event_shape = tuple(int(d) for d in event_shape)
    sequences = model_type == "hmdm"
    # HMDM scores one t-draw per frame and step (its chain pools neighbouring frames; see EMConfig.num_t)
    em_config = em.EMConfig(num_classes=num_classes, num_t=1 if sequences else 2)
    if name == "cpu-small":
        # width 256, depth 3: ≈ 4× cheaper than the "mlp" preset per frame, as accurate on 8×8 digits.
        # Frames larger than the width (28×28) need the input skip to pass the noise through, and class
        # scores are sums over D values: the temperature grows with D (0.15 per 64 values), otherwise the
        # E-step is so sharp on 28×28 that all frames collapse into one or two states (measured; √D
        # scaling still collapsed).
        dim = int(np.prod(event_shape))
        network = dataclasses.replace(models.get_model_config("mlp"), mlp_width=256, mlp_depth=3,
                                      mlp_input_skip=dim > 256)
        em_config = dataclasses.replace(em_config, temperature=em_config.temperature * max(1.0, dim / 64))
        loop = LoopConfig(num_steps=3000, batch_size=8 if sequences else 256)
        if not sequences:
            # the label-free band choice: the mixture on all digits reached 0.846 / 0.865 (seeds 0 / 1) with
            # it against 0.822 / 0.823 with the fixed 30–60 % band (RESULTS.md); HMDM measured worse with it.
            # Ward's clusters as the warm start, with that band choice: 0.930 / 0.922 / 0.926 (seeds 0–2)
            # against 0.846 / 0.865 / 0.860 from k-means (the band chosen is 5–20 % of T, not 10–40 %);
            # with 10 % labels 0.978 / 0.976 / 0.986 on the masked labels against 0.972 / 0.967 / 0.968
            # from seeded k-means. Ward needs O(N²) memory, so larger image sets keep k-means.
            fits_ward = data.get("num_images", 0) <= warm_start.MAX_WARD_FRAMES
            loop = dataclasses.replace(loop, final_estimator="elbo", final_num_t=50, observed_batch_fraction=0.5,
                                       select_t_range=True, warm_start="ward" if fits_ward else "kmeans")
            if data.get("observed_labels", 0) > 0:
                # the label loss: 0.972 / 0.960 / 0.954 on the masked labels (10 % observed, seeds 0–2)
                # against 0.944 / 0.949 / 0.947 without; α = 0.3 tied 0.1, α = 1 lost 1.6 points (seed 1).
                # Without labels it would only cost K network passes and shift the random streams.
                # 6,000 steps: 0.972 / 0.967 / 0.968 against 0.972 / 0.960 / 0.954 at 3,000 (k-means start;
                # 1,639 s, two runs sharing 2 cores).
                em_config = dataclasses.replace(em_config, label_loss_weight=0.1)
                loop = dataclasses.replace(loop, num_steps=6000)
        return RunConfig(model_type, network, em_config, event_shape, loop=loop, data=tuple(data.items()))
    if name in ("gpu", "tpu"):
        network = models.get_model_config(_unet_for(event_shape))
        frames = 1024 if name == "gpu" else 4096
        loop = LoopConfig(
            num_steps=50_000, batch_size=frames // 32 if sequences else frames, eval_every=5000,
            checkpoint_every=2000, steps_per_call=1,
        )
        optim = OptimConfig(learning_rate=2e-4, warmup_steps=1000, ema_decay=0.9995)
        return RunConfig(model_type, network, em_config, event_shape, optim=optim, loop=loop, data=tuple(data.items()))
    raise ValueError(f"unknown preset {name!r}; expected cpu-small, gpu or tpu")


def _unet_for(event_shape):
    h = event_shape[0]
    return {8: "digits8-unet", 28: "mnist28-unet", 32: "cifar32-unet"}.get(h, "mnist28-unet")


# --------------------------------------------------------------------------------------------------
# Building the pieces of a run


class RunParts(NamedTuple):
    """The static pieces a run is built from (not saved; rebuilt from the config)."""

    model: Any
    eps_fn: Callable
    schedule: diffusion.Schedule
    optimizer: optax.GradientTransformation


def build_parts(config: RunConfig) -> RunParts:
    """Model, ``eps_fn``, schedule and optimizer for ``config``."""
    model = models.build_model(config.network, config.em.num_classes)
    schedule = diffusion.get_schedule(config.diffusion.schedule, config.diffusion.num_steps)
    o = config.optim
    lr = optax.linear_schedule(0.0, o.learning_rate, max(o.warmup_steps, 1))
    optimizer = optax.chain(optax.clip_by_global_norm(o.grad_clip), optax.adam(lr))
    return RunParts(model, models.make_eps_fn(model), schedule, optimizer)


def load_run(workdir: str | Path, step: int | None = None) -> tuple[RunConfig, RunParts, TrainState, dict]:
    """The config, parts, restored state and checkpoint metadata of the run in ``workdir`` (read-only).

    Raises ``checkpoint.CheckpointNotFoundError`` naming the directory when there is no checkpoint.
    """
    directory = Path(workdir) / "checkpoints"
    config = RunConfig.from_dict(checkpoint.read_config(directory, step))
    parts = build_parts(config)
    with checkpoint.Checkpointer.open(directory, read_only=True) as ckpt:
        state, metadata = ckpt.restore(init_state(config, parts), step)
    return config, parts, state, metadata


def init_state(config: RunConfig, parts: RunParts) -> TrainState:
    """A fresh state: parameters from ``config.seed``, uniform π and A."""
    key = jax.random.PRNGKey(config.seed)
    params = models.init_params(jax.random.fold_in(key, 1), parts.model, config.event_shape)
    return create_train_state(key, params, parts.optimizer, config.em.num_classes, config=config)


def make_step(config: RunConfig, parts: RunParts, mesh=None) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """The jitted step ``(state, batch) -> (state, metrics)`` with key ``fold_in(state.key, state.step)``.

    With ``loop.steps_per_call > 1`` the returned function takes batches stacked on a leading axis of
    that size and runs them in one ``lax.scan``. On more than one device the step is data-parallel.
    """
    factory = hmdm.make_train_step if config.model_type == "hmdm" else mixture.make_train_step
    args = (config.em, parts.eps_fn, parts.schedule, parts.optimizer)
    kwargs = dict(ema_decay=config.optim.ema_decay)
    if mesh is not None and mesh.devices.size > 1:
        inner = parallel.make_parallel_step(factory, mesh, *args, **kwargs)
    else:
        inner = factory(*args, **kwargs)

    def one(state, batch):
        return inner(state, batch, jax.random.fold_in(state.key, state.step))

    if config.loop.steps_per_call == 1:
        return jax.jit(one, donate_argnums=0)
    return jax.jit(lambda state, batches: jax.lax.scan(one, state, batches), donate_argnums=0)


# --------------------------------------------------------------------------------------------------
# Data handling


def batch_indices(seed: int, step: int, num_items: int, batch_size: int) -> np.ndarray:
    """The item indices of the batch at ``step``: a fresh permutation per epoch, a function of (seed, step)."""
    if batch_size > num_items:
        raise ValueError(f"batch_size {batch_size} exceeds the {num_items} training items")
    per_epoch = num_items // batch_size
    epoch, within = divmod(step, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(num_items)
    return perm[within * batch_size : (within + 1) * batch_size]


def steps_per_epoch(config: RunConfig, num_items: int) -> int:
    return num_items // config.loop.batch_size


class TrainData(NamedTuple):
    """Training data in memory.

    Attributes:
      images: ``[N, *event]`` (mixture) or ``[N, n, *event]`` (HMDM), float32 in [−1, 1].
      labels: ``[N]`` / ``[N, n]`` int32 true labels for evaluation (−1 = unknown or padding).
      observed: ``[N]`` / ``[N, n]`` bool, the labels that are clamped in training.
      mask: ``[N, n]`` bool valid frames (HMDM), None for the mixture.
    """

    images: np.ndarray
    labels: np.ndarray
    observed: np.ndarray
    mask: np.ndarray | None = None


def training_labels(config: RunConfig, data: TrainData) -> np.ndarray:
    """The label array fed to the step (−1 = unknown): observed labels plus, during the warm start,
    k-means labels on the rest. Returns ``[2, N(, n)]``: row 0 during the warm start, row 1 after."""
    clamped = np.where(data.observed, data.labels, -1).astype(np.int32)
    if config.loop.warm_start == "none" or config.loop.warm_start_steps <= 0:
        return np.stack([clamped, clamped])
    if config.loop.warm_start not in warm_start.METHODS:
        raise ValueError(f"unknown warm_start {config.loop.warm_start!r}; expected one of "
                         f"{warm_start.METHODS + ('none',)}")
    valid = np.ones(data.labels.shape, bool) if data.mask is None else data.mask
    frames = data.images[valid]
    k = config.em.num_classes
    km = np.full(data.labels.shape, -1, np.int32)
    # With observed labels of every class, k-means starts from their class means (seeded k-means)
    km[valid] = warm_start.cluster_labels(frames, k, config.loop.warm_start, seed=config.seed,
                                          seed_labels=clamped[valid])
    observed = valid & (clamped >= 0)
    if observed.any():
        # Observed labels clamp state k to label k: renumber the clusters to match them (one-to-one on the
        # observed frames), otherwise the warm start trains each state on one cluster and one label. (Seeded
        # clusters already start numbered so, but k-means may move them, and unseeded ones are arbitrary.)
        mapping = acc_metrics.best_matching(clamped[observed], km[observed], k, k)
        km[valid] = mapping[km[valid]]
    return np.stack([np.where(clamped >= 0, clamped, km), clamped])


def make_batch(config: RunConfig, data: TrainData, labels: np.ndarray, step: int, reseed=None) -> dict:
    """The global batch at ``step``; on several hosts, this host's contiguous share of it.

    The indices are a function of (seed, step) only, so every host agrees on the global batch and each
    reads just its ``1/process_count`` share; ``parallel.global_batch`` then assembles the global array.
    """
    idx = batch_indices(config.seed, step, len(data.images), config.loop.batch_size)
    num_observed = round(config.loop.observed_batch_fraction * config.loop.batch_size)
    items = np.flatnonzero(data.observed.reshape(len(data.observed), -1).any(axis=1)) if num_observed else []
    if len(items):  # unsupervised (no observed labels): plain batches
        rng = np.random.default_rng([config.seed, step, OBSERVED_BATCH_KEY])
        idx = np.concatenate([idx[: len(idx) - num_observed],
                              rng.choice(items, num_observed, replace=num_observed > len(items))])
    if jax.process_count() > 1:
        idx = np.array_split(idx, jax.process_count())[jax.process_index()]
    warm = step < config.loop.warm_start_steps
    if reseed is not None and step < reseed["until"]:
        batch_labels = np.asarray(reseed["labels"], np.int32).reshape(labels.shape[1:])[idx]
    else:
        batch_labels = labels[0 if warm else 1][idx]
    batch = {"images": data.images[idx], "labels": batch_labels}
    if data.mask is not None:
        batch["mask"] = data.mask[idx]
    return batch


RESEED_KEY = 0x5EED  # folded into the run's key for the re-seed decoding (independent of training draws)
SELECT_KEY = 0x5E1EC7  # likewise for the scoring-band choice
HARD_ESTEP_KEY = 0xE57E9  # likewise for the periodic hard E-step
OBSERVED_BATCH_KEY = 0x0B5  # seeds the draw of the observed items of a batch (with seed and step)


def reseed_dead_states(config: RunConfig, parts: RunParts, state: TrainState, data: TrainData,
                       clamped: np.ndarray, states: np.ndarray | None = None) -> np.ndarray | None:
    """Clamp labels that revive dead states, or None when every state is alive.

    Decodes the training data; each state used by fewer than ``reseed_min_usage / K`` of the valid frames
    one of the two 2-means halves of the most used state's frames (the half without its first frame).
    Only those reassigned frames (and the user's observed labels) are clamped; the rest stay free.

    ``states``: the training data's decoded states when the caller has them (the hard E-step of the same
    step), so that the data is not decoded twice.

    Returns:
      labels shaped like ``data.labels`` (−1 = free), or None.
    """
    k = config.em.num_classes
    if states is None:
        states = predict_states(config, parts, state, data.images, data.mask, num_t=config.loop.reseed_num_t,
                                batch_size=config.loop.eval_batch_size,
                                key=jax.random.fold_in(state.key, RESEED_KEY))["states"]
    valid = np.ones(states.shape, bool) if data.mask is None else data.mask
    usage = acc_metrics.class_usage(states[valid], k)
    dead = [int(d) for d in np.flatnonzero(usage < config.loop.reseed_min_usage / k)]
    if not dead:
        return None
    current = np.where(clamped >= 0, clamped, states)
    touched = np.zeros(states.shape, bool)
    event_ndim = data.images.ndim - states.ndim
    for d in dead:
        largest = int(np.argmax(acc_metrics.class_usage(current[valid], k)))
        members = (current == largest) & valid & (clamped < 0)
        if members.sum() < 2:
            continue
        frames = data.images[members].reshape((-1,) + data.images.shape[-event_ndim:])
        halves = warm_start.kmeans_labels(frames, 2, seed=config.seed, pca_dims=20)
        current[members] = np.where(halves == halves[0], largest, d)
        touched |= members
    return np.where(touched, current, clamped).astype(np.int32)


def with_t_range(config: RunConfig, band) -> RunConfig:
    """``config`` with the E-step scoring band ``em.t_range = band``."""
    return dataclasses.replace(config, em=dataclasses.replace(config.em, t_range=tuple(float(b) for b in band)))


def choose_t_range(config: RunConfig, parts: RunParts, state: TrainState, data: TrainData,
                   assignment: np.ndarray) -> tuple[tuple[float, float], list[float]]:
    """The label-free scoring band (:func:`em.select_t_range`) on a fixed random subset of the valid
    training frames and their current ``assignment`` (the warm-start labels; frames with −1 are skipped).

    Returns ``(band, agreement per em.CANDIDATE_BANDS)``.
    """
    valid = (assignment >= 0) & (np.ones(assignment.shape, bool) if data.mask is None else data.mask)
    frames, classes = data.images[valid], assignment[valid]
    if len(frames) == 0:
        raise ValueError("loop.select_t_range needs an assignment of the training frames: use warm_start='kmeans'")
    rng = np.random.default_rng([config.seed, SELECT_KEY])
    take = np.sort(rng.permutation(len(frames))[: config.loop.select_frames])
    params = state.ema_params if config.em.score_with_ema else state.params
    band, agreement = em.select_t_range(config.em, parts.eps_fn, params, parts.schedule, jnp.asarray(frames[take]),
                                        jnp.asarray(classes[take], jnp.int32), jax.random.fold_in(state.key, SELECT_KEY))
    return band, [float(a) for a in np.asarray(agreement)]


# --------------------------------------------------------------------------------------------------
# Evaluation


def final_estimator(config: RunConfig) -> str:
    """The emission estimator of final decoding: ``loop.final_estimator``, else the training one."""
    return config.loop.final_estimator or config.em.estimator


def predict_states(config: RunConfig, parts: RunParts, state: TrainState, images, mask, *, num_t: int,
                   batch_size: int, key=None, estimator: str | None = None, progress: bool = False) -> dict:
    """Decoded states of sequences (HMDM: Viterbi, marginals, log-joint) or images (mixture), batched.

    Uses the EMA parameters; each batch is one jit-compiled call (emissions, then Viterbi and smoothing).
    ``estimator``/``num_t`` override the training emission estimator and its number of t-draws.
    """
    key = jax.random.PRNGKey(config.seed + 7) if key is None else key
    out: dict[str, list] = {}
    fn = _decoder(config, parts, num_t, estimator)
    starts = range(0, len(images), batch_size)
    for start in tqdm(starts, disable=not progress, desc="decode", unit="batch"):
        sl = slice(start, start + batch_size)
        args = (state.ema_params, state.log_pi, state.log_A, jnp.asarray(images[sl]))
        if config.model_type == "hmdm":
            res = fn(*args, jnp.asarray(mask[sl]), jax.random.fold_in(key, start))
            parts_out = {"states": res.states, "log_joint": res.log_joint, "marginals": res.marginals}
        else:
            classes, log_post = fn(*args, jax.random.fold_in(key, start))
            parts_out = {"states": classes, "log_posterior": log_post}
        for name, value in parts_out.items():
            out.setdefault(name, []).append(np.asarray(value))
    return {name: np.concatenate(v) for name, v in out.items()}


_DECODERS: dict = {}


def _decoder(config: RunConfig, parts: RunParts, num_t: int, estimator: str | None = None):
    cache_key = (config.em, config.model_type, id(parts.eps_fn), num_t, estimator)
    if cache_key not in _DECODERS:
        if config.model_type == "hmdm":
            def fn(params, log_pi, log_A, images, mask, key):
                return hmdm.decode(config.em, parts.eps_fn, params, parts.schedule, log_pi, log_A, images, mask,
                                   key, num_t=num_t, estimator=estimator)
        else:
            def fn(params, log_pi, log_A, images, key):
                return mixture.predict(config.em, parts.eps_fn, params, parts.schedule, log_pi, images, key,
                                       num_t=num_t, estimator=estimator)
        _DECODERS[cache_key] = jax.jit(fn)
    return _DECODERS[cache_key]


def evaluate(config: RunConfig, parts: RunParts, state: TrainState, train: TrainData, heldout: TrainData | None,
             *, num_t: int, true_A: np.ndarray | None = None, max_train_items: int = 64,
             estimator: str | None = None) -> dict:
    """Held-out accuracy (Hungarian and with the matching learned on training labels), class usage,
    π and A (and A's mean absolute error against ``true_A`` after matching). ``estimator``: decode with
    this emission estimator (None: the training one)."""
    ev = config.loop.eval_batch_size
    k = config.em.num_classes
    result: dict[str, Any] = {"log_pi": np.asarray(state.log_pi).tolist()}
    n_train = min(len(train.images), max_train_items)
    tr = predict_states(config, parts, state, train.images[:n_train],
                        None if train.mask is None else train.mask[:n_train], num_t=num_t, batch_size=ev,
                        estimator=estimator)
    train_true = train.labels[:n_train].reshape(-1)
    train_pred = tr["states"].reshape(-1)
    mapping = None
    if np.any(train_true >= 0):
        mapping = acc_metrics.best_matching(train_true, train_pred, None, k)  # one entry per state
        result["train_accuracy"] = acc_metrics.accuracy_with_mapping(train_true, train_pred, mapping)
        result["matching"] = np.asarray(mapping).tolist()
    result["class_usage"] = acc_metrics.class_usage(train_pred[train_pred >= 0], k).tolist()
    if config.model_type == "hmdm":
        result["A"] = np.exp(np.asarray(state.log_A)).round(4).tolist()
    if heldout is not None:
        ho = predict_states(config, parts, state, heldout.images, heldout.mask, num_t=num_t, batch_size=ev,
                            estimator=estimator)
        true, pred = heldout.labels.reshape(-1), ho["states"].reshape(-1)
        result["heldout_accuracy"], _ = acc_metrics.matched_accuracy(true, pred)
        if mapping is not None:
            result["heldout_accuracy_train_matching"] = acc_metrics.accuracy_with_mapping(true, pred, mapping)
        result.update({f"heldout_{n}": v for n, v in acc_metrics.clustering_scores(true, pred).items()})
        result["heldout_states"] = ho["states"]
    if true_A is not None and mapping is not None and config.model_type == "hmdm":
        result["A_mae"] = transition_error(np.exp(np.asarray(state.log_A)), true_A, mapping)
    return result


def transition_error(learned_A: np.ndarray, true_A: np.ndarray, mapping) -> float:
    """Mean absolute error between the learned A, relabelled by ``mapping`` (state → label), and true A.

    States that map to no label (−1) are ignored; when the mapping is a permutation all K² entries count.
    """
    mapping = np.asarray(mapping)
    ok = mapping >= 0
    rows = np.flatnonzero(ok)
    learned = learned_A[np.ix_(rows, rows)]
    true = true_A[np.ix_(mapping[rows], mapping[rows])]
    return float(np.mean(np.abs(learned - true)))


# --------------------------------------------------------------------------------------------------
# The loop


class TrainResult(NamedTuple):
    """What :func:`train` returns: the final state, the last evaluation, the run's static parts, and the
    config as trained (``em.t_range`` as chosen when ``loop.select_t_range``; decode with this one)."""

    state: TrainState
    evaluation: dict
    parts: RunParts
    config: RunConfig
    stopped_early: bool = False  # a SIGTERM/Ctrl-C (or preemption) ended the loop before num_steps


def _jsonable(d: dict) -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, (np.ndarray, jax.Array)):
            v = np.asarray(v)
            v = v.item() if v.ndim == 0 else v.tolist()
        elif isinstance(v, (np.floating, np.integer)):
            v = v.item()
        out[k] = v
    return out


def train(
    config: RunConfig,
    data: TrainData,
    workdir: str | Path,
    *,
    heldout: TrainData | None = None,
    resume: bool = False,
    true_A: np.ndarray | None = None,
    progress: bool = True,
    init_params: Any = None,
    stop_after: int | None = None,
) -> TrainResult:
    """Trains ``config`` on ``data``, writing ``config.json``, ``metrics.jsonl`` and checkpoints to ``workdir``.

    Args:
      heldout: sequences (images) for periodic evaluation (labels used only there).
      resume: continue from the latest checkpoint in ``workdir/checkpoints`` (error if none).
      true_A: the data's transition matrix, to report A's error after matching (synthetic sequences).
      init_params: start from these ε-network parameters (fine-tuning a pretrained diffusion).
      stop_after: stop (with a checkpoint) after this many steps in this call; for tests and demos of resume.

    SIGTERM and Ctrl-C stop the loop after the current step, save a checkpoint and return normally.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    parts = build_parts(config)
    state = init_state(config, parts)
    if init_params is not None:
        state = create_train_state(state.key, init_params, parts.optimizer, config.em.num_classes, config=config)
    ckpt = checkpoint.Checkpointer.open(workdir / "checkpoints", max_to_keep=config.loop.keep_checkpoints,
                                        save_every=config.loop.checkpoint_every or 10**12)
    reseed, band = None, None
    if resume:
        state, restored_metadata = ckpt.restore(state)
        reseed = restored_metadata.get("reseed")
        if restored_metadata.get("t_range") is not None:
            band = tuple(restored_metadata["t_range"])
            config = with_t_range(config, band)
            state = state.replace(config=config)
    (workdir / "config.json").write_text(json.dumps(config.to_dict(), indent=2))

    labels = training_labels(config, data)
    if config.loop.select_t_range and band is None and not (labels[0] >= 0).any():
        raise ValueError("loop.select_t_range chooses the band from the warm-start assignment: set "
                         "loop.warm_start='kmeans' (or observe some labels)")
    mesh = parallel.data_mesh() if len(jax.devices()) > 1 else None
    step_fn, single_fn = _step_functions(config, parts, mesh)
    fused = config.loop.steps_per_call
    if mesh is not None:
        parallel.check_divisible(config.loop.batch_size, mesh)
    # Several hosts: each passes its share and the global array is assembled over the mesh.
    place = (lambda b: parallel.global_batch(b, mesh)) if jax.process_count() > 1 else (lambda b: b)
    n_items = len(data.images)
    per_epoch = steps_per_epoch(config, n_items)
    last_eval: dict = {}
    start = int(state.step)
    end = config.loop.num_steps if stop_after is None else min(config.loop.num_steps, start + stop_after)
    end_of_run = config.loop.num_steps
    metrics_file = open(workdir / "metrics.jsonl", "a")
    bar = tqdm(total=end - start, initial=0, disable=not progress, desc=config.model_type, unit="step")
    frames_per_step = config.loop.batch_size * (1 if data.mask is None else data.images.shape[1])
    t_last, step_last = time.perf_counter(), start
    stopped_early = False
    try:
        with checkpoint.PreemptionGuard() as guard:
            step = start
            while step < end:
                n_now = fused if end - step >= fused else 1
                if n_now > 1:
                    batches = [make_batch(config, data, labels, step + i, reseed) for i in range(fused)]
                    stacked = jax.tree.map(lambda *xs: np.stack(xs), *batches)
                    state, metrics = step_fn(state, place(stacked))
                    metrics = jax.tree.map(lambda m: m[-1], metrics)
                else:
                    state, metrics = single_fn(state, place(make_batch(config, data, labels, step, reseed)))
                prev, step = step, step + n_now
                bar.update(n_now)
                if config.em.prior_update == "epoch" and step // per_epoch > prev // per_epoch:
                    state = em.end_epoch(config.em, state)
                if config.loop.log_every and (step // config.loop.log_every > prev // config.loop.log_every or step == end):
                    now = time.perf_counter()
                    rate = (step - step_last) * frames_per_step / max(now - t_last, 1e-9)
                    t_last, step_last = now, step
                    record = {"step": step, **_jsonable(metrics), "frames_per_sec": rate}
                    metrics_file.write(json.dumps(record) + "\n")
                    metrics_file.flush()
                    bar.set_postfix(loss=f"{record['loss']:.4f}", fps=f"{rate:.0f}")
                if config.loop.eval_every and step // config.loop.eval_every > prev // config.loop.eval_every:
                    last_eval = evaluate(config, parts, state, data, heldout, num_t=config.loop.eval_num_t, true_A=true_A)
                    record = {"step": step, "eval": _jsonable({k: v for k, v in last_eval.items() if k != "heldout_states"})}
                    metrics_file.write(json.dumps(record) + "\n")
                    metrics_file.flush()
                    if progress:
                        tqdm.write(_eval_line(step, last_eval))
                hard, decoded = config.loop.hard_estep_every, None
                if hard and step // hard > prev // hard and step >= config.loop.warm_start_steps and step < end_of_run:
                    decoded = predict_states(config, parts, state, data.images, data.mask,
                                             num_t=config.loop.hard_estep_num_t, batch_size=config.loop.eval_batch_size,
                                             estimator=config.loop.hard_estep_estimator,
                                             key=jax.random.fold_in(state.key, HARD_ESTEP_KEY))["states"]
                    assigned = np.where(labels[1] >= 0, labels[1], decoded).astype(np.int32)
                    reseed = {"until": step + hard, "labels": assigned.reshape(-1).tolist()}
                every = config.loop.reseed_every
                if (every and step // every > prev // every and step >= config.loop.warm_start_steps
                        and step + config.loop.reseed_steps < end_of_run):
                    revived = reseed_dead_states(config, parts, state, data, labels[1], states=decoded)
                    if revived is not None:
                        until = step + config.loop.reseed_steps
                        if hard and reseed is not None and step < reseed["until"]:
                            # keep the hard E-step's assignment outside the re-seeded frames
                            assigned = np.asarray(reseed["labels"], np.int32).reshape(revived.shape)
                            revived, until = np.where(revived >= 0, revived, assigned), max(until, reseed["until"])
                        reseed = {"until": until, "labels": revived.reshape(-1).tolist()}
                        tqdm.write(f"step {step}: re-seeding dead states (clamped until step {reseed['until']})")
                if (config.loop.select_t_range and band is None
                        and prev < max(config.loop.warm_start_steps, 1) <= step):
                    band, agreement = choose_t_range(config, parts, state, data, labels[0])
                    config = with_t_range(config, band)
                    state = state.replace(config=config)
                    step_fn, single_fn = _step_functions(config, parts, mesh)
                    (workdir / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
                    metrics_file.write(json.dumps({"step": step, "t_range": list(band),
                                                   "band_agreement": dict(zip(map(str, em.CANDIDATE_BANDS), agreement))}) + "\n")
                    tqdm.write(f"step {step}: scoring band t_range = {band} (agreement "
                               + ", ".join(f"{b}: {a:.3f}" for b, a in zip(em.CANDIDATE_BANDS, agreement)) + ")")
                ckpt.save(state, metadata=_metadata(last_eval, reseed, band))
                # Multi-host: every process must stop at the same step, which JAX's preemption sync decides.
                if ckpt.reached_preemption(step) if jax.process_count() > 1 else guard.should_stop:
                    tqdm.write(f"stop requested at step {step}: saving a checkpoint and exiting")
                    stopped_early = step < end
                    break
            ckpt.save(state, metadata=_metadata(last_eval, reseed, band), force=True)
    finally:
        bar.close()
        metrics_file.close()
        ckpt.wait()
        ckpt.close()
    return TrainResult(state, last_eval, parts, config, stopped_early)


def _step_functions(config: RunConfig, parts: RunParts, mesh) -> tuple[Callable, Callable]:
    """The loop's jitted step (``steps_per_call`` fused) and the single step for a remainder."""
    step_fn = make_step(config, parts, mesh)
    if config.loop.steps_per_call == 1:
        return step_fn, step_fn
    unfused = dataclasses.replace(config, loop=dataclasses.replace(config.loop, steps_per_call=1))
    return step_fn, make_step(unfused, parts, mesh)


def _metadata(evaluation: dict, reseed: dict | None, band: tuple | None = None) -> dict:
    """Checkpoint metadata: the state-to-label matching (when known), an active re-seed clamp, and the
    scoring band chosen by ``loop.select_t_range``."""
    out = {"matching": evaluation["matching"]} if "matching" in evaluation else {}
    if reseed is not None:
        out["reseed"] = reseed
    if band is not None:
        out["t_range"] = list(band)
    return out


def _eval_line(step: int, ev: dict) -> str:
    items = [f"step {step}"]
    for key in ("heldout_accuracy", "heldout_accuracy_train_matching", "train_accuracy", "A_mae"):
        if key in ev:
            items.append(f"{key}={ev[key]:.4f}")
    if "class_usage" in ev:
        items.append("usage=" + ",".join(f"{u:.2f}" for u in ev["class_usage"]))
    return "  ".join(items)
