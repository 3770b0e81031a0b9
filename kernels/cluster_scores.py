"""MPCache cluster scores: how much the current query may attend to each cluster of keys.

Given the per-cluster key extrema r^max, r^min (:mod:`kernels.cluster_summary`), MPCache ranks clusters by the
MPC-friendly linearisation of the Quest upper bound (MPCache §6, arXiv:2501.06807):

    exact bound (Quest, Eq. 2):  s_c = sum_i max(q_i * rmax[c, i], q_i * rmin[c, i])
    linearised (used):           s_c = sum_i q_i * (alpha * rmax[c, i] + (1 - alpha) * rmin[c, i]),  alpha = 0.6

The linear form needs no secret max: b_c = alpha * rmax + (1 - alpha) * rmin is a public linear combination of
shares, and the score is one matrix-vector product q . B^T. Neither form is scaled by 1/sqrt(D).

The query is per KV head: for grouped-query attention the caller sums the G query heads of a group first.
"""

from __future__ import annotations

import torch

from kernels._triton import next_pow2, tl, triton, use_triton

__all__ = [
    "cluster_scores",
    "cluster_scores_exact_reference",
    "cluster_scores_reference",
    "cluster_scores_triton",
]

ALPHA = 0.6  # MPCache's weight on r^max


def _check(q: torch.Tensor, rmax: torch.Tensor, rmin: torch.Tensor) -> None:
    if rmax.dim() != 3 or rmax.shape != rmin.shape:
        raise ValueError(f"rmax, rmin must both be (Hkv, C, D), got {tuple(rmax.shape)} and {tuple(rmin.shape)}")
    if q.shape != (rmax.shape[0], rmax.shape[2]):
        raise ValueError(f"q must be (Hkv, D) = {(rmax.shape[0], rmax.shape[2])}, got {tuple(q.shape)}")


# --------------------------------------------------------------------------------------------------------------
# References: the readable spec.
# --------------------------------------------------------------------------------------------------------------
def cluster_scores_reference(
    q: torch.Tensor, rmax: torch.Tensor, rmin: torch.Tensor, alpha: float = ALPHA
) -> torch.Tensor:
    """Linearised MPCache cluster scores (torch, fp32).

    Parameters
    ----------
    q : Tensor, shape (Hkv, D)
        Query per KV head (already summed over the G query heads of the group).
    rmax, rmin : Tensor, shape (Hkv, C, D)
        Per-cluster key max / min.
    alpha : float
        Public weight of rmax; MPCache uses 0.6.

    Returns
    -------
    s : Tensor, shape (Hkv, C), float32
        s[h, c] = sum_i q[h, i] * (alpha * rmax[h, c, i] + (1 - alpha) * rmin[h, c, i]).
    """
    _check(q, rmax, rmin)
    b = alpha * rmax.float() + (1 - alpha) * rmin.float()  # representative key per cluster, (Hkv, C, D)
    return (q.float()[:, None, :] * b).sum(dim=-1)


def cluster_scores_exact_reference(q: torch.Tensor, rmax: torch.Tensor, rmin: torch.Tensor) -> torch.Tensor:
    """Quest upper bound on max_{k in cluster} q . k (torch, fp32).

    Parameters and shapes as :func:`cluster_scores_reference`;
    s[h, c] = sum_i max(q[h, i] * rmax[h, c, i], q[h, i] * rmin[h, c, i]).
    """
    _check(q, rmax, rmin)
    qf = q.float()[:, None, :]
    return torch.maximum(qf * rmax.float(), qf * rmin.float()).sum(dim=-1)


# --------------------------------------------------------------------------------------------------------------
# Triton kernel: one program per (KV head, block of BLOCK_C clusters); the whole head dim in one tile.
# --------------------------------------------------------------------------------------------------------------
@triton.jit
def _cluster_scores_kernel(
    Q,
    RMAX,
    RMIN,
    OUT,  # pointers
    C,
    D,
    alpha,
    stride_qh,
    stride_qd,
    stride_rh,
    stride_rc,
    stride_rd,  # RMAX and RMIN share one layout
    stride_oh,
    stride_oc,
    EXACT: tl.constexpr,  # True: Quest bound; False: MPCache linearisation
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,  # next_pow2(D)
):
    h = tl.program_id(0)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    ds = tl.arange(0, BLOCK_D)
    c_ok = cs < C
    d_ok = ds < D

    q = tl.load(Q + h * stride_qh + ds * stride_qd, mask=d_ok, other=0.0).to(tl.float32)
    offs = h * stride_rh + cs[:, None] * stride_rc + ds[None, :] * stride_rd
    mask = c_ok[:, None] & d_ok[None, :]
    hi = tl.load(RMAX + offs, mask=mask, other=0.0).to(tl.float32)
    lo = tl.load(RMIN + offs, mask=mask, other=0.0).to(tl.float32)

    # Padded dimensions load 0 and add 0 to the sum in both modes.
    if EXACT:
        terms = tl.maximum(q[None, :] * hi, q[None, :] * lo)
    else:
        terms = q[None, :] * (alpha * hi + (1 - alpha) * lo)
    s = tl.sum(terms, axis=1)  # (BLOCK_C,)

    tl.store(OUT + h * stride_oh + cs * stride_oc, s, mask=c_ok)


def cluster_scores_triton(
    q: torch.Tensor, rmax: torch.Tensor, rmin: torch.Tensor, alpha: float = ALPHA, exact: bool = False
) -> torch.Tensor:
    """Triton version of the cluster scores; ``exact=True`` computes the Quest bound (alpha is then unused)."""
    _check(q, rmax, rmin)
    rmax, rmin = rmax.contiguous(), rmin.contiguous()  # one shared layout for the kernel; no copy if contiguous
    Hkv, C, D = rmax.shape
    s = torch.empty(Hkv, C, dtype=torch.float32, device=rmax.device)
    # NOTE: 32 clusters x next_pow2(D) per program keeps two fp32 tiles at <= 4096 values each for D <= 128.
    # Not tuned on a GPU yet; the op is a tiny matrix-vector product, so any sane block is bandwidth bound.
    BLOCK_C = min(next_pow2(C), 32)
    grid = (Hkv, triton.cdiv(C, BLOCK_C))
    _cluster_scores_kernel[grid](
        q,
        rmax,
        rmin,
        s,
        C,
        D,
        float(alpha),
        q.stride(0),
        q.stride(1),
        rmax.stride(0),
        rmax.stride(1),
        rmax.stride(2),
        s.stride(0),
        s.stride(1),
        EXACT=bool(exact),
        BLOCK_C=BLOCK_C,
        BLOCK_D=next_pow2(D),
    )
    return s


def cluster_scores(
    q: torch.Tensor, rmax: torch.Tensor, rmin: torch.Tensor, alpha: float = ALPHA, exact: bool = False
) -> torch.Tensor:
    """Cluster scores, (Hkv, C) float32: Triton on CUDA tensors or under ``TRITON_INTERPRET=1``, else torch.

    ``exact=False``: :func:`cluster_scores_reference` (MPCache); ``exact=True``:
    :func:`cluster_scores_exact_reference` (Quest bound).
    """
    if use_triton(q, rmax, rmin):
        return cluster_scores_triton(q, rmax, rmin, alpha, exact)
    if exact:
        return cluster_scores_exact_reference(q, rmax, rmin)
    return cluster_scores_reference(q, rmax, rmin, alpha)
