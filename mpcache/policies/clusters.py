"""Cluster (page) summaries kept incrementally in a layer's policy state, and the two cluster scores.

A cluster is ``group`` consecutive rows. Its per-dimension key max/min is computed once, at the first decode
step at which the cluster is full, and stored in ``ctx.state``; a parent cluster's summary is the max/min of
its children's summaries, never a recomputation from the keys. Cache rows never change after the prefill's
compaction (decoding only appends), so a stored summary stays valid.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class Summaries:
    """Summaries of the first ``count`` full clusters: ``max``/``min`` (Hkv, count, D) and, if an ``alpha`` was
    given, the representative keys ``rep = alpha * max + (1 - alpha) * min`` (stored: made once per cluster)."""

    count: int = 0
    max: Any = None
    min: Any = None
    rep: Any = None


def grow(
    backend, state: dict, key: str, src_max, src_min, group: int, alpha: float | None = None, upto: int | None = None
) -> Summaries:
    """Extend ``state[key]`` to every full group of ``group`` rows of ``src_max``/``src_min`` (Hkv, N, D) (to the
    first ``upto`` groups at most).

    Only the groups completed since the last call are reduced: ``max`` over ``src_max``'s rows, ``min`` over
    ``src_min``'s (pass the keys twice for leaf clusters, the children's max and min for parents). The sources
    must only ever grow at the end. Cost per new cluster: a max and a min over ``group`` rows, in one tournament
    (or in a caller's tournament: :func:`pending` and :func:`extend`).
    """
    old = state.get(key) or Summaries()
    full = int(src_max.shape[1]) // group
    full = full if upto is None else min(full, upto)
    if full <= old.count:
        return old
    hkv, d = int(src_max.shape[0]), int(src_max.shape[2])
    rows = slice(old.count * group, full * group)
    new = full - old.count
    mx, mn = backend.max_min(
        src_max[:, rows].reshape(hkv, new, group, d), src_min[:, rows].reshape(hkv, new, group, d), dim=2
    )  # one tournament for both
    return extend(backend, state, key, mx, mn, alpha)


def pending(backend, state: dict, key: str, keys, group: int):
    """The leaf clusters of ``keys`` (Hkv, N, D) completed but not yet summarised in ``state[key]``, as ONE tensor
    (2, Hkv, new, D, group) whose max along the last dim is (max, -min) of each new cluster (the stacked (k, -k)
    of :meth:`max_min`), for a caller to reduce inside its own tournament; None when there is none."""
    old = state.get(key) or Summaries()
    full = int(keys.shape[1]) // group
    if full <= old.count:
        return None
    hkv, d = int(keys.shape[0]), int(keys.shape[2])
    blk = keys[:, old.count * group : full * group].reshape(hkv, full - old.count, group, d).transpose(2, 3)
    return backend.stack([blk, backend.neg(blk)], dim=0)


def extend(backend, state: dict, key: str, mx, mn, alpha: float | None = None) -> Summaries:
    """Append the summaries (max, min) (Hkv, new, D) of the next ``new`` clusters to ``state[key]``."""
    old = state.get(key) or Summaries()
    count = old.count + int(mx.shape[1])
    rep = None if alpha is None else mx * alpha + mn * (1.0 - alpha)
    if rep is not None:
        # written once, multiplied by every later query: a fixed operand under MPC (its mask opened once, so each
        # step's q · rep opens only q, and a one-hot gather of reps only the one-hot)
        (rep,) = backend.fix_rows([rep])
    if old.count:
        mx, mn = backend.cat([old.max, mx], dim=1), backend.cat([old.min, mn], dim=1)
        rep = None if alpha is None else backend.cat([old.rep, rep], dim=1)
    state[key] = Summaries(count, mx, mn, rep)
    return state[key]


def linear_scores(backend, q, rep):
    """q (Hkv, D), rep (Hkv, C, D) -> (Hkv, C): q · rep, one matmul (MPCache's alpha-linearised bound)."""
    hkv, c = int(rep.shape[0]), int(rep.shape[1])
    return backend.matmul(q.reshape(hkv, 1, int(q.shape[-1])), rep.transpose(1, 2)).reshape(hkv, c)


def bound_scores(backend, q, rmax, rmin, head_reduce: str = "sum"):
    """Exact per-dimension upper bound (Quest; MPCache's Eq. 2), combined over the query heads of a KV group.

    q (Hkv, G, D), rmax/rmin (Hkv, C, D) -> (Hkv, C) = sum_g sum_i max(q_gi * rmax_ci, q_gi * rmin_ci): an
    upper bound on the sum over the group's heads of each head's largest q·k in the cluster. Costs 2·G·C·D
    secret products and G·C·D secret maxima (one comparison layer). ``head_reduce="max"``: the max over the
    group's heads of each head's bound instead of the sum (G·C more comparisons, log2(G) more layers).
    """
    q = q.unsqueeze(2)  # (Hkv, G, 1, D)
    hi, lo = q * rmax.unsqueeze(1), q * rmin.unsqueeze(1)  # (Hkv, G, C, D)
    per_head = backend.max(backend.stack([hi, lo], dim=0), dim=0).sum(dim=-1)  # (Hkv, G, C)
    return per_head.sum(dim=1) if head_reduce == "sum" else backend.max(per_head, dim=1)
