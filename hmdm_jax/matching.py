"""Label accuracy under label switching, clustering scores and class usage.

A model trained without (or with few) labels names its states arbitrarily: state 3 may hold the
digit 7. Accuracy is therefore reported after a one-to-one *matching* of states to classes chosen by
the Hungarian algorithm (maximum total agreement). Two ways of using it:

* ``matched_accuracy(true, pred)`` learns the matching on the data it scores (the usual clustering
  accuracy; optimistic on small sets);
* ``best_matching`` on training data, saved with the checkpoint, then ``accuracy_with_mapping`` on new
  data: the honest number for a model deployed as a classifier.

Conventions: labels and states are integer arrays of any (equal) shape, e.g. ``[N]`` frames or
``[N, n]`` sequences; ``-1`` marks padding or an unknown label and such entries are ignored wherever
either side is ``-1``. A *mapping* is an int array ``[K_pred]``; ``mapping[s]`` is the class matched to
state ``s`` or ``-1`` for a state with no class (possible only when ``K_pred > K_true``).
Everything here is NumPy (host side), not jit-compiled: metrics run once per evaluation.
"""
from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

__all__ = [
    "best_matching",
    "matched_accuracy",
    "accuracy_with_mapping",
    "clustering_scores",
    "masked_label_accuracy",
    "class_usage",
    "confusion_matrix",
    "transition_error",
]


def _as_int_array(x, name: str) -> np.ndarray:
    a = np.asarray(x)
    if a.dtype == bool or not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
        raise ValueError(f"{name} must be an integer array, got dtype {a.dtype}")
    if np.issubdtype(a.dtype, np.floating):
        if not np.all(np.isfinite(a)) or np.any(a != np.round(a)):
            raise ValueError(f"{name} must hold integers, got non-integer floats")
    a = a.astype(np.int64)
    if np.any(a < -1):
        raise ValueError(f"{name} holds values < -1; only -1 may mark unknown/padding")
    return a


def _paired(true, pred) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flattens both arrays and returns (true, pred, valid) with valid = both sides != -1."""
    t = _as_int_array(true, "true labels")
    p = _as_int_array(pred, "predicted states")
    if t.shape != p.shape:
        raise ValueError(f"true labels {t.shape} and predicted states {p.shape} must have the same shape")
    t, p = t.reshape(-1), p.reshape(-1)
    return t, p, (t >= 0) & (p >= 0)


def _num_or_infer(values: np.ndarray, given: int | None, name: str) -> int:
    inferred = int(values.max()) + 1 if values.size else 0
    if given is None:
        return max(inferred, 1)
    if inferred > given:
        raise ValueError(f"{name}={given} but the data contain value {inferred - 1}")
    return int(given)


def confusion_matrix(true, pred, num_classes: int | None = None, num_states: int | None = None) -> np.ndarray:
    """Counts of (true class, predicted state) pairs.

    Args:
      true: int labels, any shape, ``-1`` = unknown (ignored).
      pred: int states, same shape, ``-1`` = none (ignored).
      num_classes: K_true (rows); inferred as ``max(true) + 1`` when None.
      num_states: K_pred (columns); inferred as ``max(pred) + 1`` when None.

    Returns:
      ``[K_true, K_pred]`` int64 counts; ``conf[c, s]`` = #entries with label c predicted as state s.
    """
    t, p, valid = _paired(true, pred)
    k_true = _num_or_infer(t[t >= 0], num_classes, "num_classes")
    k_pred = _num_or_infer(p[p >= 0], num_states, "num_states")
    conf = np.zeros((k_true, k_pred), dtype=np.int64)
    np.add.at(conf, (t[valid], p[valid]), 1)
    return conf


def best_matching(true_labels, pred_states, num_classes: int | None = None,
                  num_states: int | None = None) -> np.ndarray:
    """The one-to-one state→class matching that maximises agreement (Hungarian algorithm).

    Args:
      true_labels: int labels, any shape, ``-1`` ignored.
      pred_states: int states, same shape, ``-1`` ignored.
      num_classes: K_true; inferred from the labels when None.
      num_states: K_pred; inferred from the states when None. Pass it when some states are unused.

    Returns:
      ``mapping``: ``[K_pred]`` int64, ``mapping[s]`` = class matched to state s. When K_pred > K_true,
      the K_pred − K_true states left without a class map to ``-1`` (their predictions count as errors).
      When K_pred ≤ K_true every state gets a distinct class; a state unused in this data still gets
      one of the leftover classes (any choice gives the same accuracy here; one-to-one keeps it a
      proper relabelling when reused on new data).
    """
    conf = confusion_matrix(true_labels, pred_states, num_classes, num_states)  # [K_true, K_pred]
    rows, cols = linear_sum_assignment(conf.T, maximize=True)  # rows: states, cols: classes
    mapping = np.full(conf.shape[1], -1, dtype=np.int64)
    mapping[rows] = cols
    return mapping


def accuracy_with_mapping(true, pred, mapping) -> float:
    """Accuracy of ``mapping[pred]`` against ``true`` over entries where neither is ``-1``.

    Use it with a matching learned on training data to score new data without re-matching.

    Args:
      true: int labels, any shape.
      pred: int states, same shape, values in ``[0, len(mapping))`` or ``-1``.
      mapping: ``[K_pred]`` int, state → class (``-1`` = no class: always wrong).

    Returns:
      accuracy in [0, 1], or NaN when no entry is scored.
    """
    t, p, valid = _paired(true, pred)
    mapping = np.asarray(mapping, dtype=np.int64).reshape(-1)
    if p.size and p.max() >= mapping.shape[0]:
        raise ValueError(f"predicted state {int(p.max())} has no entry in a mapping of length {mapping.shape[0]}")
    if not valid.any():
        return float("nan")
    return float(np.mean(mapping[p[valid]] == t[valid]))


def matched_accuracy(true, pred, num_classes: int | None = None,
                     num_states: int | None = None) -> tuple[float, np.ndarray]:
    """Hungarian-matched accuracy: the matching is learned on the same data it scores.

    Returns:
      ``(accuracy, mapping)`` with accuracy in [0, 1] (NaN if nothing is scored) and mapping ``[K_pred]``
      as in :func:`best_matching`.
    """
    mapping = best_matching(true, pred, num_classes, num_states)
    return accuracy_with_mapping(true, pred, mapping), mapping


def masked_label_accuracy(true, pred, observed_mask, mapping=None) -> float:
    """Accuracy on the labels that were hidden from the model during training.

    Args:
      true: int ground-truth labels, any shape (``-1`` = unknown or padding, ignored).
      pred: int predicted states, same shape.
      observed_mask: bool, same shape; True where the label was given to the model in training.
        Only entries with ``observed_mask == False`` are scored.
      mapping: ``[K_pred]`` state → class. None means states already are classes (identity), as when
        observed labels clamp state k to class k.

    Returns:
      accuracy in [0, 1] on the hidden labels, NaN when there are none.
    """
    t, p, _ = _paired(true, pred)
    observed = np.asarray(observed_mask)
    if observed.dtype != bool:
        raise ValueError(f"observed_mask must be boolean, got dtype {observed.dtype}")
    if observed.size != t.size or observed.shape != np.shape(true):
        raise ValueError(f"observed_mask {observed.shape} must have the shape of the labels {np.shape(true)}")
    hidden = ~observed.reshape(-1)
    if mapping is None:
        mapping = np.arange(max(int(p.max()) + 1 if p.size else 1, 1))
    return accuracy_with_mapping(t[hidden], p[hidden], mapping)


def clustering_scores(true, pred) -> dict[str, float]:
    """Adjusted Rand index and normalised mutual information (sklearn), ignoring ``-1`` entries.

    Both are invariant to relabelling the states, need no matching, and allow K_pred ≠ K_true.

    Returns:
      ``{"ari": float, "nmi": float}``; NaN for both when nothing is scored.
    """
    t, p, valid = _paired(true, pred)
    if not valid.any():
        return {"ari": float("nan"), "nmi": float("nan")}
    return {
        "ari": float(adjusted_rand_score(t[valid], p[valid])),
        "nmi": float(normalized_mutual_info_score(t[valid], p[valid])),
    }


def class_usage(states, num_states: int) -> np.ndarray:
    """Fraction of entries assigned to each state, ignoring ``-1``.

    Args:
      states: int states, any shape, values in ``[0, num_states)`` or ``-1``.
      num_states: K.

    Returns:
      ``[K]`` float64 fractions summing to 1 (all zeros when no entry is valid). A collapsed model
      shows up as a few states taking almost all the mass.
    """
    s = _as_int_array(states, "states").reshape(-1)
    s = s[s >= 0]
    if s.size and s.max() >= num_states:
        raise ValueError(f"state {int(s.max())} out of range for num_states={num_states}")
    counts = np.bincount(s, minlength=num_states).astype(np.float64)
    total = counts.sum()
    return counts / total if total > 0 else counts


def transition_error(learned_A, true_A, mapping) -> float:
    """Mean absolute error between the learned ``A [K, K]``, relabelled by ``mapping`` (state → label),
    and the true ``A``. States that map to no label (−1) are ignored; with a permutation all K² entries count."""
    mapping = np.asarray(mapping)
    rows = np.flatnonzero(mapping >= 0)
    learned = np.asarray(learned_A)[np.ix_(rows, rows)]
    true = np.asarray(true_A)[np.ix_(mapping[rows], mapping[rows])]
    return float(np.mean(np.abs(learned - true)))
