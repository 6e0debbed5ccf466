"""A toy training process for tests/test_checkpoint.py (run as a subprocess; also imported).

Modes:
  train DIR STEPS SAVE_EVERY SLEEP_S   train to STEPS (resuming from DIR if it holds a checkpoint),
                                       printing "START s", "STEP s" after every completed step,
                                       "STOPPED s <signal>" after a signal, and "DONE s".
  crash DIR SIZE                       commit step 1 of a SIZE-float state, start the save of step
                                       2, print "IN_FLIGHT" and sleep (the test SIGKILLs it).
"""
from __future__ import annotations

import dataclasses
import sys
import time

import jax
import jax.numpy as jnp
import optax

from hmdm_jax.checkpoint import Checkpointer, PreemptionGuard
from hmdm_jax.state import TrainState, create_train_state

NUM_CLASSES = 3
MATCHING = [2, 0, 1]


@dataclasses.dataclass(frozen=True)
class ToyNet:
    width: int = 5


@dataclasses.dataclass(frozen=True)
class ToyConfig:
    """Nested frozen config, like a real run's."""

    num_classes: int = NUM_CLASSES
    net: ToyNet = ToyNet()
    learning_rate: float = 0.05
    ema_decay: float = 0.9


OPTIMIZER = optax.adam(0.05)


def toy_state(config: ToyConfig = ToyConfig(), seed: int = 0, big: int = 0) -> TrainState:
    """A fresh TrainState: params {"w": [width], "b": [2, width]} (+ "big": [big] if big > 0)."""
    k = config.num_classes
    pkey = jax.random.PRNGKey(seed + 1)
    params = {
        "w": jax.random.normal(pkey, (config.net.width,)),
        "b": jnp.zeros((2, config.net.width)),
    }
    if big:
        params["big"] = jax.random.normal(jax.random.fold_in(pkey, 1), (big,))
    return create_train_state(jax.random.PRNGKey(seed), params, OPTIMIZER, k)


@jax.jit
def toy_train_step(state: TrainState) -> TrainState:
    """One deterministic step: Adam on a noisy quadratic, EMA, and count updates from fold_in keys.

    Elementwise arithmetic (one 3-element sum), so results are bit-for-bit reproducible.
    """
    key = jax.random.fold_in(state.key, state.step)
    k_noise, k_class = jax.random.split(key)
    noise = jax.tree.map(
        lambda p, i: jax.random.normal(jax.random.fold_in(k_noise, i), p.shape),
        state.params, {n: i for i, n in enumerate(sorted(state.params))})
    grads = jax.tree.map(lambda p, e: 2.0 * (p - 1.0 + 0.1 * e), state.params, noise)
    updates, opt_state = OPTIMIZER.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    decay = ToyConfig().ema_decay
    ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
    k = state.log_pi.shape[0]
    c = jax.random.randint(k_class, (2,), 0, k)
    class_counts = state.class_counts.at[c[0]].add(1.0)
    transition_counts = state.transition_counts.at[c[0], c[1]].add(1.0)
    log_pi = jnp.log((class_counts + 1.0) / (class_counts + 1.0).sum())
    return state.replace(
        step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state,
        class_counts=class_counts, transition_counts=transition_counts, log_pi=log_pi,
        log_A=state.log_A + 0.0 * transition_counts)


def train(directory: str, num_steps: int, save_every: int, sleep_s: float) -> None:
    state = toy_state()
    with Checkpointer.open(directory, save_every=save_every, config=ToyConfig()) as ckpt, PreemptionGuard() as guard:
        if ckpt.latest_step() is not None:
            state, _ = ckpt.restore(state)
        print("START", int(state.step), flush=True)
        while int(state.step) < num_steps:
            state = toy_train_step(state)
            ckpt.save(state, step=int(state.step), metadata={"state_to_label": MATCHING})
            print("STEP", int(state.step), flush=True)
            if guard.should_stop:
                ckpt.save(state, step=int(state.step), metadata={"state_to_label": MATCHING}, force=True)
                ckpt.wait()
                print("STOPPED", int(state.step), guard.signal_name, flush=True)
                return
            time.sleep(sleep_s)
        ckpt.save(state, step=int(state.step), metadata={"state_to_label": MATCHING}, force=True)
    print("DONE", int(state.step), flush=True)


def crash(directory: str, size: int) -> None:
    state = toy_state(big=size)
    ckpt = Checkpointer.open(directory, save_every=1, config=ToyConfig())
    ckpt.save(state.replace(step=jnp.ones((), jnp.int32)), step=1)
    ckpt.wait()
    ckpt.save(state.replace(step=jnp.full((), 2, jnp.int32)), step=2)
    print("IN_FLIGHT", flush=True)
    time.sleep(60)


if __name__ == "__main__":
    mode, args = sys.argv[1], sys.argv[2:]
    if mode == "train":
        train(args[0], int(args[1]), int(args[2]), float(args[3]))
    elif mode == "crash":
        crash(args[0], int(args[1]))
    else:
        raise SystemExit(f"unknown mode {mode!r}")
