"""Decode attention over selected clusters of the KV cache (one new query token, grouped-query aware).

After MPCache picks k clusters per KV head (:mod:`kernels.cluster_scores` + top-k), the new token attends only
to the union of the tokens of those clusters:

    o[h] = softmax_t( q[h] . K[h // G, t] * scale ) @ V[h // G, t],   t in union of clusters sel[h // G, :], t < L

The kernel follows flash-decoding (Dao et al., 2023): the selected clusters of each KV head are split into
chunks, each program gathers its clusters' K/V rows and keeps a running max m, running sum l and an unnormalised
accumulator (online softmax, all fp32); a second small kernel merges the chunks.
"""

from __future__ import annotations

import torch

from kernels._triton import INTERPRET, next_pow2, tl, triton, use_triton

__all__ = [
    "dense_decode_attention_reference",
    "sparse_decode_attention",
    "sparse_decode_attention_reference",
    "sparse_decode_attention_triton",
]

LOG2E = 1.4426950408889634


def _check(q, K, V, L):
    if q.dim() != 2 or K.dim() != 3 or K.shape != V.shape or q.shape[1] != K.shape[2]:
        raise ValueError(
            f"need q (H, D), K = V (Hkv, Lmax, D); got {tuple(q.shape)}, {tuple(K.shape)}, {tuple(V.shape)}"
        )
    H, Hkv = q.shape[0], K.shape[0]
    if H % Hkv:
        raise ValueError(f"query heads H={H} must be a multiple of KV heads Hkv={Hkv}")
    L = K.shape[1] if L is None else int(L)
    if not 1 <= L <= K.shape[1]:
        raise ValueError(f"L must be in [1, {K.shape[1]}], got {L}")
    return H // Hkv, L


# --------------------------------------------------------------------------------------------------------------
# References: the readable spec.
# --------------------------------------------------------------------------------------------------------------
def dense_decode_attention_reference(
    q: torch.Tensor, K: torch.Tensor, V: torch.Tensor, L: int | None = None, scale: float | None = None
) -> torch.Tensor:
    """Ordinary decode attention over the first L cache rows (torch, fp32 math).

    Parameters
    ----------
    q : Tensor, shape (H, D)
        The new token's query, H = Hkv * G heads; head h reads KV head h // G.
    K, V : Tensor, shape (Hkv, Lmax, D)
    L : int, optional
        Valid rows (default Lmax); rows >= L are padding.
    scale : float, optional
        Logit scale, default 1 / sqrt(D).

    Returns
    -------
    o : Tensor, shape (H, D), dtype of q
    """
    G, L = _check(q, K, V, L)
    scale = q.shape[1] ** -0.5 if scale is None else scale
    k = K[:, :L].float().repeat_interleave(G, dim=0)  # (H, L, D)
    v = V[:, :L].float().repeat_interleave(G, dim=0)
    p = torch.softmax(torch.einsum("hd,hld->hl", q.float(), k) * scale, dim=-1)
    return torch.einsum("hl,hld->hd", p, v).to(q.dtype)


def sparse_decode_attention_reference(
    q: torch.Tensor,
    K: torch.Tensor,
    V: torch.Tensor,
    sel: torch.Tensor,
    cluster_size: int,
    L: int | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Decode attention restricted to the tokens of the selected clusters (torch, fp32 math).

    Parameters
    ----------
    q : Tensor, shape (H, D)
        H = Hkv * G query heads; head h reads KV head h // G.
    K, V : Tensor, shape (Hkv, Lmax, D)
    sel : Tensor, shape (Hkv, k), integer
        Selected cluster indices per KV head, each in [0, ceil(L / S)), no duplicates within a row.
        Cluster c holds tokens [c*S, c*S + S); a partial last cluster contributes only its tokens < L.
    cluster_size : int
        S.
    L : int, optional
        Valid rows (default Lmax); rows >= L are never attended to.
    scale : float, optional
        Logit scale, default 1 / sqrt(D).

    Returns
    -------
    o : Tensor, shape (H, D), dtype of q
    """
    G, L = _check(q, K, V, L)
    Hkv, Lmax, D = K.shape
    scale = D**-0.5 if scale is None else scale
    chosen = torch.zeros(Hkv, -(-Lmax // cluster_size), dtype=torch.bool, device=K.device)
    chosen.scatter_(1, sel.long(), True)  # (Hkv, C): cluster chosen?
    keep = chosen.repeat_interleave(cluster_size, dim=1)[:, :Lmax]  # (Hkv, Lmax): token chosen?
    keep &= torch.arange(Lmax, device=K.device) < L
    keep = keep.repeat_interleave(G, dim=0)  # (H, Lmax)
    logits = torch.einsum("hd,hld->hl", q.float(), K.float().repeat_interleave(G, dim=0)) * scale
    p = torch.softmax(logits.masked_fill(~keep, float("-inf")), dim=-1)
    return torch.einsum("hl,hld->hd", p, V.float().repeat_interleave(G, dim=0)).to(q.dtype)


# --------------------------------------------------------------------------------------------------------------
# Triton kernels. Pass 1: one program per (KV head, chunk of selected clusters), all G query heads of the group
# at once, so every gathered K/V row is read from memory once. Pass 2: merge the chunks of each query head.
# --------------------------------------------------------------------------------------------------------------
@triton.jit
def _sparse_decode_split_kernel(
    Q,
    K,
    V,
    SEL,  # inputs
    M_PART,
    L_PART,
    ACC_PART,  # per-chunk running max (H, NS), running sum (H, NS), accumulator (H, NS, D)
    L,
    S,
    G,
    D,
    n_sel,
    clusters_per_split,
    qk_scale,  # scale * log2(e): logits in base 2, so exp2 can be used
    stride_qh,
    stride_qd,
    stride_kh,
    stride_kl,
    stride_kd,
    stride_vh,
    stride_vl,
    stride_vd,
    stride_sh,
    stride_sk,
    stride_mh,
    stride_ms,  # M_PART and L_PART share one layout
    stride_ah,
    stride_as,
    stride_ad,
    BLOCK_G: tl.constexpr,  # next_pow2(G): query heads of one KV head
    BLOCK_S: tl.constexpr,  # next_pow2(S): one cluster of tokens per loop step
    BLOCK_D: tl.constexpr,  # next_pow2(D)
):
    kv = tl.program_id(0)
    split = tl.program_id(1)

    g = tl.arange(0, BLOCK_G)
    t = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    heads = kv * G + g
    g_ok = g < G
    d_ok = d < D

    q = tl.load(
        Q + heads[:, None] * stride_qh + d[None, :] * stride_qd, mask=g_ok[:, None] & d_ok[None, :], other=0.0
    ).to(tl.float32)
    q = q * qk_scale

    # A finite start for the running max: a step whose rows are all masked then gives exp2(-inf - (-1e30)) = 0
    # instead of exp2(-inf - (-inf)) = nan, and an empty chunk ends with l = 0 and weighs 0 in the merge.
    m_i = tl.full([BLOCK_G], -1e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)

    first = split * clusters_per_split
    last = tl.minimum(first + clusters_per_split, n_sel)
    for i in range(first, last):
        c = tl.load(SEL + kv * stride_sh + i * stride_sk)
        rows = c * S + t
        row_ok = (t < S) & (rows < L)  # power-of-two padding and padding rows >= L are excluded
        kv_mask = row_ok[:, None] & d_ok[None, :]
        k = tl.load(
            K + kv * stride_kh + rows[:, None] * stride_kl + d[None, :] * stride_kd, mask=kv_mask, other=0.0
        ).to(tl.float32)
        v = tl.load(
            V + kv * stride_vh + rows[:, None] * stride_vl + d[None, :] * stride_vd, mask=kv_mask, other=0.0
        ).to(tl.float32)

        # NOTE: (G, S, D) broadcast-and-sum instead of tl.dot: tl.dot needs every block dim >= 16 and G is 1-8,
        # and fp32 tl.dot would round through tf32. Decode attention is bandwidth bound, so the FLOPs are free.
        s = tl.sum(q[:, None, :] * k[None, :, :], axis=2)  # (BLOCK_G, BLOCK_S) logits, base 2
        s = tl.where(row_ok[None, :], s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])
        rescale = tl.exp2(m_i - m_new)
        l_i = l_i * rescale + tl.sum(p, axis=1)
        acc = acc * rescale[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        m_i = m_new

    ml = heads * stride_mh + split * stride_ms
    tl.store(M_PART + ml, m_i, mask=g_ok)
    tl.store(L_PART + ml, l_i, mask=g_ok)
    a = heads[:, None] * stride_ah + split * stride_as + d[None, :] * stride_ad
    tl.store(ACC_PART + a, acc, mask=g_ok[:, None] & d_ok[None, :])


@triton.jit
def _merge_splits_kernel(
    M_PART,
    L_PART,
    ACC_PART,
    OUT,
    n_splits,
    D,
    stride_mh,
    stride_ms,
    stride_ah,
    stride_as,
    stride_ad,
    stride_oh,
    stride_od,
    BLOCK_SPLITS: tl.constexpr,  # next_pow2(n_splits)
    BLOCK_D: tl.constexpr,
):
    h = tl.program_id(0)
    sp = tl.arange(0, BLOCK_SPLITS)
    d = tl.arange(0, BLOCK_D)
    sp_ok = sp < n_splits
    d_ok = d < D

    m = tl.load(M_PART + h * stride_mh + sp * stride_ms, mask=sp_ok, other=-1e30)
    l_sum = tl.load(L_PART + h * stride_mh + sp * stride_ms, mask=sp_ok, other=0.0)
    acc = tl.load(
        ACC_PART + h * stride_ah + sp[:, None] * stride_as + d[None, :] * stride_ad,
        mask=sp_ok[:, None] & d_ok[None, :],
        other=0.0,
    )

    # Bring every chunk to the common max, then normalise once.
    w = tl.exp2(m - tl.max(m, axis=0))  # (BLOCK_SPLITS,)
    o = tl.sum(w[:, None] * acc, axis=0) / tl.sum(w * l_sum, axis=0)
    tl.store(OUT + h * stride_oh + d * stride_od, o.to(OUT.dtype.element_ty), mask=d_ok)


def _default_splits(n_sel: int, Hkv: int, device: torch.device) -> int:
    """Chunks per KV head: enough programs to fill the GPU, and 2 under the interpreter (exercises the merge)."""
    if INTERPRET or device.type != "cuda":
        return min(n_sel, 2)
    # NOTE: ~2 programs per SM is the usual flash-decoding target; not yet measured on our shapes.
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(n_sel, triton.cdiv(2 * sms, Hkv)))


def sparse_decode_attention_triton(
    q: torch.Tensor,
    K: torch.Tensor,
    V: torch.Tensor,
    sel: torch.Tensor,
    cluster_size: int,
    L: int | None = None,
    scale: float | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Triton version of :func:`sparse_decode_attention_reference`.

    ``num_splits`` chunks the k selected clusters of each KV head over that many programs (flash-decoding);
    default: enough to fill the GPU (2 under the interpreter). The result does not depend on it beyond rounding.
    """
    G, L = _check(q, K, V, L)
    H, D = q.shape
    Hkv, k_sel = sel.shape
    if Hkv != K.shape[0] or k_sel < 1:
        raise ValueError(f"sel must be (Hkv={K.shape[0]}, k >= 1), got {tuple(sel.shape)}")
    scale = D**-0.5 if scale is None else scale
    n_splits = num_splits or _default_splits(k_sel, Hkv, q.device)
    per_split = triton.cdiv(k_sel, n_splits)
    n_splits = triton.cdiv(k_sel, per_split)  # no chunk left empty

    f32 = {"dtype": torch.float32, "device": q.device}
    m_part = torch.empty(H, n_splits, **f32)
    l_part = torch.empty(H, n_splits, **f32)
    acc_part = torch.empty(H, n_splits, D, **f32)
    BLOCK_D = next_pow2(D)
    _sparse_decode_split_kernel[(Hkv, n_splits)](
        q,
        K,
        V,
        sel,
        m_part,
        l_part,
        acc_part,
        L,
        cluster_size,
        G,
        D,
        k_sel,
        per_split,
        float(scale) * LOG2E,
        q.stride(0),
        q.stride(1),
        K.stride(0),
        K.stride(1),
        K.stride(2),
        V.stride(0),
        V.stride(1),
        V.stride(2),
        sel.stride(0),
        sel.stride(1),
        m_part.stride(0),
        m_part.stride(1),
        acc_part.stride(0),
        acc_part.stride(1),
        acc_part.stride(2),
        BLOCK_G=next_pow2(G),
        BLOCK_S=next_pow2(cluster_size),
        BLOCK_D=BLOCK_D,
    )
    o = torch.empty_like(q)
    _merge_splits_kernel[(H,)](
        m_part,
        l_part,
        acc_part,
        o,
        n_splits,
        D,
        m_part.stride(0),
        m_part.stride(1),
        acc_part.stride(0),
        acc_part.stride(1),
        acc_part.stride(2),
        o.stride(0),
        o.stride(1),
        BLOCK_SPLITS=next_pow2(n_splits),
        BLOCK_D=BLOCK_D,
    )
    return o


def sparse_decode_attention(
    q: torch.Tensor,
    K: torch.Tensor,
    V: torch.Tensor,
    sel: torch.Tensor,
    cluster_size: int,
    L: int | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Sparse decode attention, (H, D): Triton on CUDA tensors or under ``TRITON_INTERPRET=1``, else torch.

    See :func:`sparse_decode_attention_reference` for parameters and shapes.
    """
    if use_triton(q, K, V, sel):
        return sparse_decode_attention_triton(q, K, V, sel, cluster_size, L, scale)
    return sparse_decode_attention_reference(q, K, V, sel, cluster_size, L, scale)
