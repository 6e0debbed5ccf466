"""The run's configuration: one frozen :class:`RunConfig`, grouped by what each section acts on.

A config is printed, saved with every checkpoint (``to_dict``/``from_dict`` round-trip through JSON) and
overridable from the command line with ``--set section.field=value`` (:func:`apply_overrides`). Options
that only mean something together live in one section (``reseed``, ``band``, ``warm_start``).
"""
from __future__ import annotations

import dataclasses
import json
import typing
from typing import Any

from hmdm_jax import em, emission, models, moves, warm_start

__all__ = [
    "MODEL_TYPES", "BandConfig", "DiffusionConfig", "EvalConfig", "LoopConfig", "OptimConfig",
    "ReseedConfig", "RestartConfig", "RunConfig", "WarmStartConfig", "apply_overrides",
]

MODEL_TYPES = ("hmdm", "mixture")
# the warm starts: the clusterings of hmdm_jax.warm_start, and "mixture" (HMDM only): the states of a
# frame-wise diffusion mixture trained first on the sequences' frames (hmdm_jax.run.mixture_start)
WARM_STARTS = warm_start.METHODS + ("mixture", "none")
# a restart method "ghmm:held" is that warm start clamped for the candidate's whole run, with no EM: the
# reference a run must beat to end above its own start (RestartConfig)
HELD = ":held"


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Adam with linear warm-up, global-norm clipping and an EMA of the parameters."""

    learning_rate: float = 1e-3
    warmup_steps: int = 200
    grad_clip: float = 1.0
    ema_decay: float = 0.995

    def __post_init__(self):
        _check(self.learning_rate > 0, "optim.learning_rate must be > 0")
        _check(self.warmup_steps >= 0, "optim.warmup_steps must be >= 0")
        _check(0.0 <= self.ema_decay < 1.0, "optim.ema_decay must be in [0, 1)")


@dataclasses.dataclass(frozen=True)
class DiffusionConfig:
    """The noise schedule (one object for training, scoring and sampling); ``timesteps`` is T."""

    schedule: str = "linear"
    timesteps: int = 1000

    def __post_init__(self):
        _check(self.timesteps >= 1, "diffusion.timesteps must be >= 1")


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """Length and batching of the loop, logging and checkpoints.

    Attributes:
      train_steps: optimizer steps.
      batch_size: frames (mixture) or sequences (HMDM) per step, global over all devices.
      steps_per_call: fuse this many steps into one jitted ``lax.scan`` (cuts dispatch on small models).
      observed_batch_fraction: this fraction of every batch is drawn from the items with at least one
        observed label, the rest uniformly (labelled data weighted up, as in semi-supervised EM, Nigam et
        al., 2000). No effect without observed labels.
      log_every, checkpoint_every: in steps (0 disables checkpoints between the final one).
      keep_checkpoints: the last k checkpoints are kept.
    """

    train_steps: int = 3000
    batch_size: int = 8
    steps_per_call: int = 1
    observed_batch_fraction: float = 0.0
    log_every: int = 50
    checkpoint_every: int = 500
    keep_checkpoints: int = 3

    def __post_init__(self):
        _check(self.train_steps >= 1, f"loop.train_steps must be >= 1, got {self.train_steps}")
        _check(self.batch_size >= 1, f"loop.batch_size must be >= 1, got {self.batch_size}")
        _check(self.steps_per_call >= 1, f"loop.steps_per_call must be >= 1, got {self.steps_per_call}")
        _check(0.0 <= self.observed_batch_fraction < 1.0,
               f"loop.observed_batch_fraction must be in [0, 1), got {self.observed_batch_fraction}")
        _check(self.log_every >= 0 and self.checkpoint_every >= 0, "loop.log_every and checkpoint_every must be >= 0")
        _check(self.keep_checkpoints >= 1, "loop.keep_checkpoints must be >= 1")


@dataclasses.dataclass(frozen=True)
class WarmStartConfig:
    """Clamp cluster labels of the frames for the first ``steps`` steps (EM from a random start leaves dead
    or merged classes).

    Attributes:
      method: "kmeans" (seeded by the class means of observed labels when every class has some), "ward"
        (Ward's agglomerative clusters; at most ``warm_start.MAX_WARD_FRAMES`` frames), "umap" (a Gaussian
        mixture on a UMAP embedding of the distinct frames, seeded like k-means), "ghmm" (HMDM only:
        the Viterbi path of a Gaussian HMM fitted to the training sequences without labels), "mixture"
        (HMDM only: the states of the frame-wise diffusion mixture of the same network, trained first for
        ``mixture_steps`` steps on the sequences' frames, :mod:`hmdm_jax.run.mixture_start`) or "none".
      steps: length of the warm start.
      mixture_steps: the "mixture" start's training steps.
    """

    method: str = "kmeans"
    steps: int = 500
    mixture_steps: int = 2000

    def __post_init__(self):
        _check(self.method in WARM_STARTS, f"warm_start.method must be one of {WARM_STARTS}, got {self.method!r}")
        _check(self.steps >= 0, "warm_start.steps must be >= 0")
        _check(self.mixture_steps >= 1, "warm_start.mixture_steps must be >= 1")

    @property
    def active(self) -> bool:
        return self.method != "none" and self.steps > 0


@dataclasses.dataclass(frozen=True)
class ReseedConfig:
    """Re-seeding: every ``every`` steps after the warm start, decode the training frames; a state used by
    fewer than ``min_usage / K`` of them takes one 2-means half of the most used state's frames, clamped for
    ``steps`` steps. With no dead state and ``split_merge``, the label-free split–merge move of
    :func:`hmdm_jax.moves.split_merge_move` (a state holding two clusters split, a pair sharing one merged)
    is clamped the same way when it gains by at least ``split_merge_z`` standard errors (its paired z-test
    over the frames involved; a smaller gain is the proxy's noise). ``every = 0`` disables both; ``num_t`` is the decoding's t-draws.
    ``check_moves`` (HMDM): a move, and a re-seeding alike, is first tried: two copies of the run train one
    period on the same batches, with and without it, and it is taken only if the chain's share of the bound on
    training sequences is higher with it by at least ``trial_z`` standard errors (a paired test over the
    sequences: :func:`hmdm_jax.run.hooks.try_move`). After a move loses, none is tried again; after a
    re-seeding loses, no state at least as used as the one it would have re-seeded counts as dead again (a
    legitimately rare state of an uneven chain, not an empty one). A state that no frame decodes to is
    re-seeded untried. Nothing is tried where the trial would not fit in the run.
    ``copy_parent``: the state that takes a half starts from the class parameters of the state it splits
    (:func:`hmdm_jax.models.copy_class`), not from what it had learnt while dead or merged."""

    every: int = 500
    min_usage: float = 0.5
    steps: int = 250
    num_t: int = 4
    split_merge: bool = False
    split_merge_z: float = moves.MIN_Z
    check_moves: bool = False
    trial_z: float = moves.MIN_Z
    copy_parent: bool = False

    def __post_init__(self):
        _check(self.every >= 0 and self.steps >= 0 and self.num_t >= 1, "reseed.every, steps >= 0 and num_t >= 1")
        _check(0.0 <= self.min_usage <= 1.0, "reseed.min_usage must be in [0, 1]")
        _check(0.0 <= self.trial_z < float("inf"), f"reseed.trial_z must be finite and >= 0, got {self.trial_z}")


@dataclasses.dataclass(frozen=True)
class RestartConfig:
    """Restarts chosen by the model's own bound: ``count`` candidate runs on the training data less a
    held-out share of ``heldout_fraction`` (sequences, or the mixture's images), each for ``steps`` steps
    (None: the whole run, ``loop.train_steps``). Candidate r has its own seed (its network init, step keys and
    warm-start draws) and the warm start ``methods[r % len(methods)]`` (empty: ``warm_start.method`` for all).
    A method with the suffix ``":held"`` (``"ghmm:held"``) keeps its warm start clamped for all the
    candidate's steps: the network trained on the start's assignment, with no EM, the reference an EM
    candidate from that start must beat. The candidate whose ``criterion`` per frame on the held-out share is
    highest is kept: "chain", the chain's share of the HMDM's likelihood bound (what the learned π, A explain
    beyond the frames), or "bound", the bound itself (the mixture's only criterion: it has no chain;
    :class:`hmdm_jax.run.restarts.Scores`; ``num_t`` ELBO terms, EMA parameters). It continues on all the
    data to ``loop.train_steps`` (nothing is left to continue when ``steps`` is None: the kept model never saw
    the held-out share).

    ``snapshot_every > 0`` scores each candidate by the same criterion every that many steps from the end of its
    warm start on, and keeps its best snapshot in place of its last state when the snapshot is higher on the
    held-out sequences by at least ``snapshot_z`` standard errors of the paired per-sequence difference: EM
    can raise the model's likelihood by drifting away from states the chain explains (RESULTS.md, stop 35), and
    the snapshot that the chain explained best is the label-free stop. The kept snapshot is the candidate's
    state at its last step, and is logged as such. ``count = 1``: no restarts, no held-out share, no snapshots."""

    count: int = 1
    steps: int | None = None
    heldout_fraction: float = 0.1
    methods: tuple[str, ...] = ()
    num_t: int = 32
    criterion: str = "chain"
    snapshot_every: int = 0
    snapshot_z: float = moves.MIN_Z

    def __post_init__(self):
        object.__setattr__(self, "methods", tuple(self.methods))
        _check(self.count >= 1, f"restarts.count must be >= 1, got {self.count}")
        _check((self.steps is None or self.steps >= 1) and self.num_t >= 1,
               "restarts.steps (None: the whole run) and restarts.num_t must be >= 1")
        _check(0.0 < self.heldout_fraction < 1.0,
               f"restarts.heldout_fraction must be in (0, 1), got {self.heldout_fraction}")
        _check(self.snapshot_every >= 0, f"restarts.snapshot_every must be >= 0 (0: no snapshots), got {self.snapshot_every}")
        _check(0.0 <= self.snapshot_z < float("inf"), f"restarts.snapshot_z must be finite and >= 0, got {self.snapshot_z}")
        _check(self.criterion in ("chain", "bound"), f"restarts.criterion must be 'chain' or 'bound', got {self.criterion!r}")
        _check(all(m.removesuffix(HELD) in WARM_STARTS and m != "none" + HELD for m in self.methods),
               f"restarts.methods must name warm starts in {WARM_STARTS}, each optionally with the suffix "
               f"{HELD!r} (that start clamped for the whole candidate), got {self.methods}")

    @property
    def active(self) -> bool:
        return self.count > 1

    def candidate_steps(self, train_steps: int) -> int:
        return train_steps if self.steps is None else self.steps


@dataclasses.dataclass(frozen=True)
class BandConfig:
    """The label-free choices of how the E-step scores, at the end of the warm start, on ``frames`` training
    frames: ``choose``, the scoring band ``em.scoring.t_range``, the candidate (``em.CANDIDATE_BANDS``) whose
    one-draw class decision best reproduces the warm-start assignment (:func:`em.select_t_range`; needs a warm
    start or observed labels); then ``temperature``, the temperature ``em.temperature.final`` at which the
    E-step's posterior (in that band) best predicts the model's own many-draw class decision
    (:func:`em.select_temperature`). Both are recorded as run decisions. ``temperature_every > 0`` (HMDM, with
    ``temperature``): the temperature is instead the one at which the chain explains the training sequences
    best with the E-step's own scores (:func:`hmdm_jax.run.hooks.chain_temperature`; the E-step weighs those
    scores against the chain), chosen at the end of the warm start and again every that many steps, as the
    network and the chain change. An option: measured on the dense random chain, it kept EM candidates from
    collapsing but did not raise the final accuracy (RESULTS.md, stop 35)."""

    choose: bool = False
    frames: int = 2048
    temperature: bool = False
    temperature_every: int = 0

    def __post_init__(self):
        _check(self.frames >= 1, "band.frames must be >= 1")
        _check(self.temperature_every >= 0, f"band.temperature_every must be >= 0 (0: once), got {self.temperature_every}")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Periodic and final decoding.

    Attributes:
      every: evaluate every this many steps (0: only at the end, by the script).
      num_t: t-draws per frame when decoding during training.
      final_num_t: t-draws (grid terms for "elbo") of the final decoding, ``decode.py`` and ``evaluate.py``.
      final_estimator: the emission estimator of that decoding (None: the training one). A likelihood
        bound ("elbo") is decoded untempered.
      batch_size: sequences (or images) decoded per jitted call.
      choose_temperature: HMDM: at the end of training, choose the final decoding's temperature, together
        with π and A refitted to the decoding's emissions at that temperature (Baum–Welch, the training's
        priors), by the likelihood the chain adds (:func:`hmdm.select_decoding`) on training sequences; the
        temperature is recorded as ``decisions["decoding_temperature"]``, the chain replaces the state's.
      temperature: the final decoding's temperature, for any estimator (None: the E-step's, or 1 for a
        likelihood bound); set by that choice.
    """

    every: int = 1000
    num_t: int = 16
    final_num_t: int = 64
    final_estimator: str | None = None
    batch_size: int = 16
    choose_temperature: bool = False
    temperature: float | None = None

    def __post_init__(self):
        _check(self.final_estimator is None or self.final_estimator in emission.ESTIMATORS,
               f"evaluation.final_estimator must be None or one of {tuple(emission.ESTIMATORS)}, "
               f"got {self.final_estimator!r}")
        _check(self.every >= 0 and self.num_t >= 1 and self.final_num_t >= 1 and self.batch_size >= 1,
               "evaluation.every >= 0, num_t, final_num_t and batch_size >= 1")
        _check(self.temperature is None or self.temperature > 0,
               f"evaluation.temperature must be None or > 0, got {self.temperature}")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything that defines a run; the checkpoint's config.

    Attributes:
      model_type: "hmdm" or "mixture".
      network: the ε-network architecture.
      em: E-step, loss and M-step options (``em.num_classes`` is K).
      event_shape: the shape of one frame, e.g. (8, 8, 1).
      seed: the run's one seed; every random stream (init, train, eval, heuristics) is split from it.
      data: a free-form record of how the data were made (source, split, sequence settings).
    """

    model_type: str
    network: models.ModelConfig
    em: em.EMConfig
    event_shape: tuple[int, ...]
    optim: OptimConfig = OptimConfig()
    diffusion: DiffusionConfig = DiffusionConfig()
    loop: LoopConfig = LoopConfig()
    warm_start: WarmStartConfig = WarmStartConfig()
    reseed: ReseedConfig = ReseedConfig()
    band: BandConfig = BandConfig()
    evaluation: EvalConfig = EvalConfig()
    restarts: RestartConfig = RestartConfig()
    seed: int = 0
    data: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self):
        _check(self.model_type in MODEL_TYPES, f"model_type must be one of {MODEL_TYPES}, got {self.model_type!r}")
        object.__setattr__(self, "event_shape", tuple(int(d) for d in self.event_shape))
        _check(isinstance(self.seed, int) and 0 <= self.seed < 2**32, f"seed must be an int in [0, 2**32), got {self.seed!r}")
        _check(self.model_type == "hmdm" or self.warm_start.method not in warm_start.SEQUENCE_METHODS + ("mixture",),
               f"warm_start.method={self.warm_start.method!r} needs sequences (HMDM); the mixture's frames have "
               "no chain: use kmeans or ward")

    @property
    def num_classes(self) -> int:
        return self.em.num_classes

    def check(self) -> None:
        """The checks across sections (a ``ValueError`` naming the problem), made once all ``--set`` overrides
        are in: one at a time, a valid combination may pass through invalid ones."""
        _check(not self.reseed.check_moves or self.model_type == "hmdm",
               "reseed.check_moves compares the HMDM's chain with and without a move: the mixture has none "
               "(set reseed.check_moves=false)")
        _check(not self.band.temperature_every or self.model_type == "hmdm",
               "band.temperature_every re-chooses HMDM's E-step temperature against its chain: the mixture has "
               "none (set band.temperature_every=0)")
        _check(not self.evaluation.choose_temperature or self.model_type == "hmdm",
               "evaluation.choose_temperature balances the frames' evidence against the HMDM's chain: the mixture "
               "has none (set evaluation.choose_temperature=false)")
        if self.restarts.active:
            _check(self.model_type == "hmdm" or self.restarts.criterion == "bound",
                   "the mixture's restarts are chosen by its bound: it has no chain (set restarts.criterion=bound)")
            steps = self.restarts.candidate_steps(self.loop.train_steps)
            _check(steps <= self.loop.train_steps,
                   f"restarts.steps ({steps}) must be at most loop.train_steps ({self.loop.train_steps})")
            _check(steps >= self.warm_start.steps,
                   f"restarts.steps ({steps}) must cover the warm start ({self.warm_start.steps} steps)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        return _from_dict(cls, d)

    def replace(self, **sections) -> "RunConfig":
        return dataclasses.replace(self, **sections)

    def with_decisions(self, decisions: dict) -> "RunConfig":
        """This config with the loop hooks' decisions applied (``{"t_range": [lo, hi]}``, the band chosen
        by ``band.choose``; ``{"temperature": τ}``, by ``band.temperature``; ``{"decoding_temperature": τ}``, by
        ``evaluation.choose_temperature``): the config a run trains and decodes with."""
        em_config = self.em
        if decisions.get("t_range") is not None:
            em_config = em_config.replace(scoring=dict(t_range=tuple(float(b) for b in decisions["t_range"])))
        if decisions.get("temperature") is not None:
            em_config = em_config.replace(temperature=dict(final=float(decisions["temperature"])))
        evaluation = self.evaluation
        if decisions.get("decoding_temperature") is not None:
            evaluation = dataclasses.replace(evaluation, temperature=float(decisions["decoding_temperature"]))
        if em_config == self.em and evaluation == self.evaluation:
            return self
        return dataclasses.replace(self, em=em_config, evaluation=evaluation)


def _from_dict(cls, d, path="config"):
    if not isinstance(d, dict):
        raise ValueError(f"{path} must be a mapping of {cls.__name__}'s fields, got {d!r}")
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
    if unknown:  # a config of another version: refuse rather than silently fall back to defaults
        raise ValueError(f"{path} has fields {unknown} that {cls.__name__} does not have (a run written by "
                         f"another version of hmdm_jax?); {cls.__name__} has {[f.name for f in dataclasses.fields(cls)]}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in d:
            continue
        value, hint = d[f.name], hints[f.name]
        if dataclasses.is_dataclass(hint):
            value = _from_dict(hint, value, f"{path}.{f.name}")
        elif isinstance(value, list):
            value = _to_tuple(value)
        kwargs[f.name] = value
    return cls(**kwargs)


def _to_tuple(value):
    return tuple(_to_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def apply_overrides(config, overrides: list[str]):
    """``config`` with dotted overrides applied, e.g. ``["loop.train_steps=100", "em.temperature.final=0.2"]``.

    Values are parsed as JSON when possible (numbers, true/false, null, lists), else kept as strings (a
    comma-separated string for a tuple of names: ``restarts.methods=kmeans,ward``), and
    must match the field's type: an unknown field or a value of the wrong type raises a ``ValueError``
    that names the field. A group given as a JSON object sets several of its fields at once, for options
    that are valid only together: ``'em.temperature={"initial": 2.0, "anneal_steps": 1000}'``.
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
    fields = {f.name: f for f in dataclasses.fields(obj)}
    if names[0] not in fields:
        raise ValueError(f"unknown config field {full!r}: {type(obj).__name__} has {sorted(fields)}")
    if len(names) == 1:
        hint = typing.get_type_hints(type(obj))[names[0]]
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            # a whole group as a JSON object: the fields given replace the current ones (options that go together)
            value = _from_dict(hint, {**dataclasses.asdict(getattr(obj, names[0])), **value}, full)
        else:
            value = _coerce(value, hint, full)
        return dataclasses.replace(obj, **{names[0]: value})
    return dataclasses.replace(obj, **{names[0]: _replace_path(getattr(obj, names[0]), names[1:], value, full)})


def _coerce(value, hint, full):
    """``value`` checked against the field's type ``hint`` (ints accepted for floats)."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, getattr(__import__("types"), "UnionType", None)) else (hint,)
    for option in options:
        if option is type(None) and value is None:
            return None
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option is bool and isinstance(value, bool):
            return value
        if option is str and isinstance(value, str):
            return value
        origin = typing.get_origin(option)
        if (option is tuple or origin is tuple) and isinstance(value, tuple):
            return value
        if origin is tuple and typing.get_args(option)[:1] == (str,) and isinstance(value, str):
            return tuple(v for v in value.split(",") if v)  # names, comma-separated: methods=kmeans,ward
        if option is Any:
            return value
    names = " or ".join(getattr(o, "__name__", str(o)) for o in options)
    raise ValueError(f"config field {full!r} expects {names}, got {value!r}")
