"""Attention over a KV cache, written once against the backend op set, and the decode routes a backend chooses.

:func:`attend` is softmax attention of a block of queries over K/V rows (prefill with a causal mask, decode with an
optional anchored softmax and public row weights). A decode step attends over the rows its policy selects
(:class:`mpcache.policies.base.Selection`); which way is the backend's choice, behind one method
(``Backend.decode_attention``): the plaintext backend gathers the rows and attends (:func:`gather_and_attend`);
the secure one attends in place when the selection is a one-hot over a fixed K/V cache (:func:`attend_selected`:
K and V never move; with its three-operand products, two rounds) and otherwise gathers. Every route computes the
same function; which one runs is decided from public facts only (the selection's form, whether the rows are fixed
operands, the protocol setting).
"""

from __future__ import annotations

import contextlib
import itertools
import math
from dataclasses import dataclass

import torch


def _no_scope(name: str):
    return contextlib.nullcontext()


@dataclass(frozen=True)
class Heads:
    """The attention's public shape: query heads, KV heads (GQA groups) and head size."""

    n_heads: int
    n_kv_heads: int
    head_dim: int

    @property
    def group_size(self) -> int:
        return self.n_heads // self.n_kv_heads


def selection_anchor(anchor, g, L: int):
    """``anchor`` (the model's decode anchor (a, b)) when the Gather ``g`` over an L-row cache attends its first a
    and last b rows by public range (so they are the attended row's first and last columns), else None."""
    if anchor is None or g is None:
        return anchor
    return anchor if g.keeps_ends(anchor[0], anchor[1], L) else None


def attend(B, heads: Heads, q, k, v, scope=_no_scope, mask=None, anchor=None, logw=None, offset=None, logits=None):
    """q (H, Tq, hd), k/v (Hkv, Lk, hd) -> out (Tq, H*hd), probs (Hkv, G*Tq, Lk). Query heads of a KV group
    are stacked so one batched matmul serves the group (GQA). ``logw`` (Lk,), public: log row weights added
    to the logits (a weighted softmax: sum_i w_i e^{s_i} v_i / sum_i w_i e^{s_i}; BalanceKV's cache).
    ``offset`` (Hkv, G*Tq, 1), decode rows with ``anchor``: the anchored softmax's offset, already made by the
    caller (``Transformer._decode_offset``). ``logits`` (Hkv, G*Tq, Lk): q K^T / sqrt(hd), already made by the caller
    (``Transformer._fix_and_score``)."""
    H, Hkv, hd, G = heads.n_heads, heads.n_kv_heads, heads.head_dim, heads.group_size
    Tq = q.shape[1]
    qg = (q * (1.0 / math.sqrt(hd))).reshape(Hkv, G * Tq, hd)
    with scope("qk"):
        s = B.matmul(qg, k.transpose(1, 2)) if logits is None else logits  # (Hkv, G*Tq, Lk)
        if logw is not None:
            s = s + logw.to(torch.float32)  # public: a local add on shares
    with scope("softmax"):
        if mask is not None:
            mask = mask.repeat(G, 1)  # (G*Tq, Lk), public
        anchor = anchor if (mask is not None or Tq == 1) else None  # decode rows, or causal (prefix-mask) rows
        offset = offset if (anchor is not None and mask is None) else None
        p = B.softmax(s, dim=-1, mask=mask, anchor=anchor, offset=offset)
    with scope("av"):
        o = B.matmul(p, v)  # (Hkv, G*Tq, hd)
    o = o.reshape(H, Tq, hd).transpose(0, 1).reshape(Tq, H * hd)
    return o, p


def attend_causal(B, heads: Heads, q, k, v, block: int, keep: int, scope=_no_scope, anchor=None, progress=None):
    """Causal attention of T queries over their own T keys in query blocks of ``block`` rows, blocks aligned to the
    END (the first block is the partial one): block [r0, r1) attends keys [0, r1) only, so the (T, T) scores are
    never built (memory ~ block x T per head) and the masked upper triangle beyond each block is never computed;
    inside a block the anchored softmax of causal rows works on the attended entries only (ops.softmax). Blocks
    run one after the other: rounds grow with the number of blocks, memory does not. ``k``/``v`` may be fixed operands (each block's products then
    open only its queries and probabilities). ``anchor``: the anchored softmax of causal rows (ops.softmax).
    Returns (out (T, H*hd), tail (H, keep', T): the probabilities of the last keep' >= keep rows (the last blocks),
    colsum (H, T): the probabilities summed over all T rows) -- what prefill policies read (PrefillContext).
    ``progress(r1)`` after each block. Public: T, block, keep (shapes only)."""
    H = heads.n_heads
    T = int(q.shape[1])
    edges = [0, *list(range(T - block, 0, -block))[::-1], T]
    n_tail = -(-keep // block)  # the last blocks hold the last >= keep rows
    outs, tails, colsum = [], [], None
    for b, (r0, r1) in enumerate(itertools.pairwise(edges)):
        mask = (torch.arange(r1)[None, :] <= torch.arange(r0, r1)[:, None]).float()  # (r1 - r0, r1)
        o, p = attend(B, heads, q[:, r0:r1], k[:, :r1], v[:, :r1], scope, mask=mask, anchor=anchor)
        outs.append(o)
        p = p.reshape(H, r1 - r0, r1)
        part = B.pad_cols(p.sum(dim=1), T)  # (H, T): this block's rows never attend keys >= r1
        colsum = part if colsum is None else colsum + part
        if b >= len(edges) - 1 - n_tail:
            tails.append(B.pad_cols(p, T))
        if progress is not None:
            progress(r1)
    tail = tails[0] if len(tails) == 1 else B.cat(tails, dim=1)
    return (outs[0] if len(outs) == 1 else B.cat(outs, dim=0)), tail, colsum


def gather(B, g, k, v):
    """The rows of K and V the policy's gather selects. A fixed cache is gathered as one [K | V] operand (one
    one-hot product opening the one-hot once, and one fixing of the picked rows), then split: views only."""
    if g is None:
        return k, v
    if B.is_fixed(k) and B.is_fixed(v):
        hd = int(k.shape[-1])
        kv = g.apply(B.cat([k, v], dim=-1), B)
        return kv[..., :hd], kv[..., hd:]
    return g.apply(k, B), g.apply(v, B)


def in_place(B, g, k, v) -> bool:
    """Whether a decode step can attend over ``g``'s selection without moving K or V: a one-hot over a fixed cache."""
    return g is not None and g.onehot is not None and B.is_fixed(k) and B.is_fixed(v) and g.covers(int(k.shape[1]))


def attend_selected(B, heads: Heads, q, g, k, v, scope=_no_scope, anchor=None, logits=None, offset=None, scores=None):
    """Decode attention over the rows a one-hot Gather selects, on a fixed K/V cache, without moving K or V:
    scores against every cached row (q·Kᵀ opens only q), the selected blocks' scores gathered by the one-hot
    (opens the one-hot and the G·L candidate scores per KV head), softmax over the attended scores, the
    selected probabilities scattered back by the one-hot's transpose (opens the one-hot and k·block·G
    probabilities), and p·V over every row (opens p: G·L). Gathering the K and V rows instead opens the
    picked rows twice as wide (2·k·block·hd per KV head, to fix them): ~2x the bytes at hd = 64, G = 3. Same
    4 rounds, 3 when the selection's q·rep product already made the logits (``logits``: DecodeContext
    .query_products). The attended set and its order are those of ``g.apply`` (same logits up to rounding).
    The softmax is anchored when ``g`` always attends the anchor rows (:func:`selection_anchor`); ``offset``
    (Hkv, G, 1) is then their logits' max if the policy already made it in its own comparison rounds. With the
    backend's three-operand products (``gathered_ok``) the gather and the scatter + p·V are one product each;
    ``scores``: the gather's product made already, in the logits' round (``Transformer._fix_and_score``)."""
    Hkv, hd, G = heads.n_kv_heads, heads.head_dim, heads.group_size
    L = int(k.shape[1])
    anchor = selection_anchor(anchor, g, L)
    start, blk, C, ksel = g.start, g.block, g.n_candidates, g.n_blocks_selected
    end = start + C * blk
    s = logits
    if s is None:
        qg = (q * (1.0 / math.sqrt(hd))).reshape(Hkv, G, hd)
        with scope("qk"):
            s = B.matmul(qg, k.transpose(1, 2))  # (Hkv, G, L)

    def to_blocks(x, n):  # (Hkv, G, n*blk) -> (Hkv, n, G*blk)
        return x.reshape(Hkv, G, n, blk).transpose(1, 2).reshape(Hkv, n, G * blk)

    def from_blocks(x, n):  # (Hkv, n, G*blk) -> (Hkv, G, n*blk)
        return x.reshape(Hkv, n, G, blk).transpose(1, 2).reshape(Hkv, G, n * blk)

    before = [(a, b) for a, b in g.ranges if b <= start]
    after = [(a, b) for a, b in g.ranges if a >= end]
    # three-operand products (mpcache.mpc.gather_triple, TFP 2PC): the selected rows' scores straight from q, the
    # one-hot and the fixed K, and p times the selected rows of the fixed V plus the always-attended rows in one
    # opening: opens q, the one-hot and the attended probabilities instead of G·L scores and G·L probabilities,
    # 2 rounds instead of 3; same function
    gathered = B.gathered_ok(g, k, v)
    with scope("gather"):
        if gathered:
            sel, opened = scores or B.gather_scores((q * (1.0 / math.sqrt(hd))).reshape(Hkv, G, hd), g, k)
        else:
            sel = from_blocks(g.select_blocks(to_blocks(s[..., start:end], C), B), ksel)
    parts = [s[..., a:b] for a, b in before] + [sel] + [s[..., a:b] for a, b in after]
    with scope("softmax"):
        p = B.softmax(
            B.cat(parts, dim=-1), dim=-1, anchor=anchor, offset=offset if anchor is not None else None
        )  # (Hkv, G, n_attended)
    at = sum(b - a for a, b in before)
    p_sel = p[..., at : at + ksel * blk]
    rest = ([p[..., :at]] if at else []) + ([p[..., at + ksel * blk :]] if after else [])
    if gathered:
        with scope("av"):
            o = B.gather_values(
                p_sel,
                opened,
                g,
                v,
                B.cat(rest, dim=-1) if len(rest) > 1 else (rest[0] if rest else None),
                tuple(before) + tuple(after),
            )  # (Hkv, G, hd)
    else:
        with scope("gather"):
            cand = from_blocks(g.scatter_blocks(to_blocks(p_sel, ksel), B), C)
        full = rest[: 1 if at else 0] + [cand] + rest[1 if at else 0 :]
        with scope("av"):
            o = B.matmul(B.cat(full, dim=-1) if len(full) > 1 else full[0], v)  # (Hkv, G, hd)
    return o.reshape(heads.n_heads, 1, hd).transpose(0, 1).reshape(1, heads.n_heads * hd)


def gather_and_attend(B, heads: Heads, q, sel, k, v, scope=_no_scope, anchor=None, logw=None):
    """The route every backend can take: gather the selected rows (public ranges: views; a one-hot: a product),
    then attend. The softmax is anchored when the selection keeps the anchor rows and the rows carry no weights
    (weighted rows may lift logits over the anchors': the row max there)."""
    g = sel.gather
    if logw is not None and g is not None:
        raise NotImplementedError("a per-step selection over a weighted (BalanceKV) cache is not supported")
    with scope("gather"):
        ks, vs = gather(B, g, k, v)
    anchor = selection_anchor(anchor, g, int(k.shape[1])) if logw is None else None
    offset = sel.offset if (anchor is not None and g is None) else None  # the full row's (Transformer._decode_offset)
    logits = sel.qk if g is None else None  # against every cached row: the attended row when nothing is gathered
    o, _ = attend(B, heads, q, ks, vs, scope, anchor=anchor, logw=logw, offset=offset, logits=logits)
    return o
