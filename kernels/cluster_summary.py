"""Per-cluster, per-dimension key extrema: the r^max / r^min summaries that MPCache scores clusters with.

The cache of one KV head is cut into contiguous clusters of S keys (in compacted order, after static eviction).
Cluster c holds keys [c*S, c*S + S); the last cluster is partial when L is not a multiple of S. For each cluster
and each of the D dimensions we keep the largest and the smallest key value (MPCache §5, arXiv:2501.06807).

Two tail rules are offered for the partial last cluster:

- ``tail="valid"`` (default): only the real keys of that cluster count, [S*(C-1), L).
- ``tail="window"``: the released MPCache code pads the last block with copies of the keys at
  [L-S, L-S+pad), so its extrema are those of the last S keys, [L-S, L) (they reach into cluster C-2).

Only ``"valid"`` summaries compose exactly: the summary of a 2S-cluster is the elementwise max/min of its two
S-children (``parent_summary``), so level-1 (S1 = 32) extrema need not be recomputed from the keys.
"""

from __future__ import annotations

import torch

from kernels._triton import next_pow2, tl, triton, use_triton

__all__ = ["cluster_summary", "cluster_summary_reference", "cluster_summary_triton", "parent_summary"]

TAILS = ("valid", "window")


def _check(K: torch.Tensor, cluster_size: int, L: int | None, tail: str) -> int:
    if K.dim() != 3:
        raise ValueError(f"K must be (Hkv, L, D), got shape {tuple(K.shape)}")
    if cluster_size < 1:
        raise ValueError(f"cluster_size must be >= 1, got {cluster_size}")
    if tail not in TAILS:
        raise ValueError(f"tail must be one of {TAILS}, got {tail!r}")
    L = K.shape[1] if L is None else int(L)
    if not 1 <= L <= K.shape[1]:
        raise ValueError(f"L must be in [1, {K.shape[1]}], got {L}")
    return L


# --------------------------------------------------------------------------------------------------------------
# Reference: the readable spec.
# --------------------------------------------------------------------------------------------------------------
def cluster_summary_reference(
    K: torch.Tensor, cluster_size: int, L: int | None = None, tail: str = "valid"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-cluster, per-dimension max and min of the keys (torch).

    Parameters
    ----------
    K : Tensor, shape (Hkv, Lmax, D)
        Keys of each KV head. Rows >= L are padding and never read.
    cluster_size : int
        S, keys per cluster.
    L : int, optional
        Number of valid rows (default: Lmax).
    tail : {"valid", "window"}
        Rule for a partial last cluster (see the module docstring).

    Returns
    -------
    rmax, rmin : Tensor, shape (Hkv, C, D), dtype of K
        C = ceil(L / S). rmax[h, c, i] = max of K[h, t, i] over the rows t of cluster c.
    """
    L = _check(K, cluster_size, L, tail)
    Hkv, _, D = K.shape
    S = cluster_size
    full = L // S  # clusters with S real keys
    body = K[:, : full * S].reshape(Hkv, full, S, D)
    rmax, rmin = body.amax(dim=2), body.amin(dim=2)
    if full * S < L:  # a partial last cluster
        start = full * S if tail == "valid" else max(L - S, 0)
        rows = K[:, start:L]
        rmax = torch.cat([rmax, rows.amax(dim=1, keepdim=True)], dim=1)
        rmin = torch.cat([rmin, rows.amin(dim=1, keepdim=True)], dim=1)
    return rmax, rmin


def parent_summary(rmax: torch.Tensor, rmin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summaries of 2S-clusters from the summaries of their two S-children (torch).

    Parent p covers children 2p and 2p+1; with an odd number of children the last parent has one child.
    Equals ``cluster_summary_reference(K, 2*S)`` exactly when the children were built with ``tail="valid"``.

    Parameters
    ----------
    rmax, rmin : Tensor, shape (Hkv, C, D)
        Child summaries.

    Returns
    -------
    rmax, rmin : Tensor, shape (Hkv, ceil(C / 2), D)
    """
    Hkv, C, D = rmax.shape
    if C % 2:  # duplicate the lone last child: max(x, x) = x
        rmax = torch.cat([rmax, rmax[:, -1:]], dim=1)
        rmin = torch.cat([rmin, rmin[:, -1:]], dim=1)
    pairs = (Hkv, (C + 1) // 2, 2, D)
    return rmax.reshape(pairs).amax(dim=2), rmin.reshape(pairs).amin(dim=2)


# --------------------------------------------------------------------------------------------------------------
# Triton kernel: one program per (KV head, cluster); the whole (S, D) tile of keys is loaded at once.
# --------------------------------------------------------------------------------------------------------------
@triton.jit
def _cluster_summary_kernel(
    K,
    RMAX,
    RMIN,  # pointers
    L,
    S,
    D,  # valid rows, cluster size, head dim
    stride_kh,
    stride_kl,
    stride_kd,
    stride_rh,
    stride_rc,
    stride_rd,  # RMAX and RMIN share one layout
    TAIL_WINDOW: tl.constexpr,
    BLOCK_S: tl.constexpr,  # next_pow2(S)
    BLOCK_D: tl.constexpr,  # next_pow2(D)
):
    h = tl.program_id(0)
    c = tl.program_id(1)

    # Rows of this cluster. In "window" mode a partial last cluster slides back to the last S keys.
    start = c * S
    if TAIL_WINDOW:
        start = tl.minimum(start, tl.maximum(L - S, 0))
    rows = start + tl.arange(0, BLOCK_S)
    cols = tl.arange(0, BLOCK_D)
    row_ok = (rows < start + S) & (rows < L)  # drops the power-of-two padding and rows >= L
    col_ok = cols < D

    ptrs = K + h * stride_kh + rows[:, None] * stride_kl + cols[None, :] * stride_kd
    k = tl.load(ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0)

    # Rows that do not belong to the cluster must never win: -inf for the max, +inf for the min.
    k_max = tl.max(tl.where(row_ok[:, None], k, float("-inf")), axis=0)
    k_min = tl.min(tl.where(row_ok[:, None], k, float("inf")), axis=0)

    out = h * stride_rh + c * stride_rc + cols * stride_rd
    tl.store(RMAX + out, k_max, mask=col_ok)
    tl.store(RMIN + out, k_min, mask=col_ok)


def cluster_summary_triton(
    K: torch.Tensor, cluster_size: int, L: int | None = None, tail: str = "valid"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of :func:`cluster_summary_reference` (same arguments, bit-identical result)."""
    L = _check(K, cluster_size, L, tail)
    Hkv, _, D = K.shape
    C = triton.cdiv(L, cluster_size)
    rmax = K.new_empty(Hkv, C, D)
    rmin = torch.empty_like(rmax)
    # NOTE: one (S, D) tile per program is enough for MPCache's S in {16, 32} and D <= 128 (<= 4096 values).
    # Not tuned on a GPU yet; much larger S * D would want a loop over row blocks.
    grid = (Hkv, C)
    _cluster_summary_kernel[grid](
        K,
        rmax,
        rmin,
        L,
        cluster_size,
        D,
        K.stride(0),
        K.stride(1),
        K.stride(2),
        rmax.stride(0),
        rmax.stride(1),
        rmax.stride(2),
        TAIL_WINDOW=tail == "window",
        BLOCK_S=next_pow2(cluster_size),
        BLOCK_D=next_pow2(D),
    )
    return rmax, rmin


def cluster_summary(
    K: torch.Tensor, cluster_size: int, L: int | None = None, tail: str = "valid"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-cluster key max/min: Triton on CUDA tensors or under ``TRITON_INTERPRET=1``, else torch.

    See :func:`cluster_summary_reference` for parameters and shapes.
    """
    if use_triton(K):
        return cluster_summary_triton(K, cluster_size, L, tail)
    return cluster_summary_reference(K, cluster_size, L, tail)
