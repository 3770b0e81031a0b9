"""One decoder-only transformer (LLaMA-style and GPT-2-style), written once against a backend op set.

The same code runs on torch tensors (:class:`mpcache.backends.PlainBackend`) and on CrypTen secret shares
(:class:`mpcache.backends.secure.SecureBackend`). Token inputs are ids (plaintext only) or one-hot rows (T, V),
the form a secret-shared token takes. Weights follow the convention of :mod:`mpcache.model.weights`
(linear weights stored (in, out), so every linear layer is ``x @ W``).

Shapes: T tokens in this call, D hidden, H query heads, Hkv KV heads, G = H / Hkv, hd head dim, L cached rows.

Why one file: a block's steps (norm, q/k/v, the decode route that makes the softmax's offset beside the norm, the
attention, the MLP) share the block's weights and the cache, and the decode route interleaves them round by round;
split across files they would pass the same half-dozen names back and forth.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch

from ..config import ModelConfig
from ..policies.base import CachePolicy, DecodeContext, PrefillContext, Selection, as_selection
from . import attention


# ---- public tables of the model (positions are public): used by both backends' runs of the model ----------------
def rope_tables(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (T, head_dim) in HF's rotate_half layout. Positions are public."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    ang = positions.to(torch.float64)[:, None] * inv[None, :]
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos().float(), ang.sin().float()


def _no_scope(name: str):
    return contextlib.nullcontext()


@dataclass
class KVCache:
    """Per-layer K/V (Hkv, L, hd) in the backend's tensor type, plus per-layer policy state."""

    n_layers: int
    k: list = field(default_factory=list)
    v: list = field(default_factory=list)
    state: list = field(default_factory=list)
    logw: list = field(default_factory=list)  # per layer: None, or (L,) public log row weights (BalanceKV)
    n_prompt: int = 0  # rows that came from the prompt (after static compaction)
    pos: int = 0  # next absolute position (public)
    ahead0: object = None  # (layer 0's Selection for the next decode step, made beside this step's last layer, and
    #                        what it left for the layers that share it: the next step's ``shared``)

    def __post_init__(self):
        self.k = [None] * self.n_layers
        self.v = [None] * self.n_layers
        self.state = [{} for _ in range(self.n_layers)]
        self.logw = [None] * self.n_layers

    @property
    def length(self) -> int:
        return 0 if self.k[0] is None else int(self.k[0].shape[1])


class Transformer:
    """Forward passes (prefill over the prompt, one-token decode) with a pluggable cache policy.

    ``scope(name)`` is a context-manager factory used to attribute costs (the session's ledger); plaintext runs
    leave it as a no-op.
    """

    def __init__(self, cfg: ModelConfig, weights: dict, backend, policy: CachePolicy | None = None, scope=None):
        self.cfg, self.w, self.B = cfg, weights, backend
        self.heads = attention.Heads(cfg.n_heads, cfg.n_kv_heads, cfg.head_dim)
        self.policy = (policy or CachePolicy()).bind(cfg)  # e.g. layer_budgets="calibrated" resolved and checked
        self.scope = scope or _no_scope

    # ---- blocks ------------------------------------------------------------------------------------------
    def _norm(self, x, prefix: str, scale: bool = False, then=None):
        """The block's norm; ``scale`` (RMSNorm with no bias after it): also R = 2^8 / sqrt(sum x^2 + D eps), the
        factor the normalised row is x times (before the gain and sqrt(D), which ``_decode_offset`` applies);
        ``then`` (a linear map; only with the gain folded into it): applied to the norm's output inside the norm's
        last rounds (``B.norm_scale``)."""
        B, cfg = self.B, self.cfg
        D = cfg.hidden_size
        # rsqrt of the SUM of squares (+ D*eps), times sqrt(D): the same value as rsqrt(mean + eps), but the
        # sum has D times more significant bits in fixed point than the mean.
        if cfg.arch != "llama":
            x = x - x.sum(dim=-1, keepdim=True) * (1.0 / D)
        gain = self.w.get(prefix + ".weight")
        assert then is None or gain is None, "then= needs the norm's gain folded into the next layer"
        n = B.norm_scale(x, D * cfg.norm_eps, scale=scale, then=then)
        n, r = n if scale else (n, None)
        if gain is not None:  # else folded into the next linear layers (weights.fold_norm_gains)
            n = n * (math.sqrt(D) * gain)
            n = n if cfg.arch == "llama" else n + self.w[prefix + ".bias"]
        return (n, r) if scale else n

    def _norm_linear(self, x, prefix: str, name: str, bias: str | None = None, scale: bool = False, w=None):
        """The block's norm, then the linear layer ``name`` (+ ``bias``). With the norm's gain folded into the layer
        (the secure path: weights.fold_norm_gains) the layer's product runs inside the norm's last rounds
        (``B.norm_scale`` ``then``: no round of its own in 2PC) for ONE row (a decode step): the norm's last product
        then runs over the layer's outputs instead of D values, bytes a many-row prefill would pay per row for one
        round in all; else after the norm. ``scale``: also the norm's R. ``w``: the weight, if not ``self.w[name]``."""
        w = self.w[name] if w is None else w
        if self.w.get(prefix + ".weight") is None and int(x.shape[0]) == 1:
            out = self._norm(x, prefix, scale=scale, then=lambda h: self.B.matmul(h, w))
        else:
            out = self._norm(x, prefix, scale=scale)
            out = (self.B.matmul(out[0], w), out[1]) if scale else self.B.matmul(out, w)
        y, r = out if scale else (out, None)
        if bias is not None and bias in self.w:
            y = y + self.w[bias]
        return (y, r) if scale else y

    def _linear(self, x, name: str, bias: str | None = None):
        y = self.B.matmul(x, self.w[name])
        if bias is not None and bias in self.w:
            y = y + self.w[bias]
        return y

    def _rope(self, x, cos, sin):
        """x (heads, T, hd) * cos + rotate_half(x) * sin; cos/sin (T, hd) are public."""
        h = x.shape[-1] // 2
        rot = self.B.cat([-x[..., h:], x[..., :h]], dim=-1)
        return x * cos + rot * sin

    def _mlp_in(self, p: str):
        """The MLP's first linear layer as one product: (weight, bias) names, or None (llama with gate and up apart)."""
        if self.cfg.arch == "llama":
            return (p + "w_gateup", None) if p + "w_gateup" in self.w else None  # fused: generation.FUSED_WEIGHTS
        return p + "w_fc", p + "b_fc"

    def _mlp(self, h, p: str, a=None):
        """The MLP of the normalised row ``h``, or from ``a``, its first layer's output (``_mlp_in``) made already."""
        B = self.B
        if self.cfg.arch == "llama":
            if a is None and self._mlp_in(p) is not None:
                a = self._linear(h, p + "w_gateup")
            if a is not None:  # fused gate | up: one product, one opening
                g, u = a[..., : self.cfg.intermediate_size], a[..., self.cfg.intermediate_size :]
            else:
                g, u = self._linear(h, p + "w_gate"), self._linear(h, p + "w_up")
            # the gate's product inside SiLU's rounds (ops.silu: where that costs fewer bytes than after it)
            return self._linear(B.silu(g, gate=u), p + "w_down")
        a = self._linear(h, p + "w_fc", p + "b_fc") if a is None else a
        a = B.silu(a) if self.cfg.activation == "silu" else B.gelu(a)
        return self._linear(a, p + "w_proj", p + "b_proj")

    def _block_in(self, x, p: str, positions: torch.Tensor, ahead=None):
        """Pre-attention of one block: norm, then q, k, v (after RoPE). Fused q/k/v: the product inside the norm's
        last rounds (``_norm_linear``: its opening is counted in the norm's scope). ``ahead`` (:meth:`_ahead_weight`):
        the next layer's query too, from the same product: returns (q, k, v, q_next)."""
        if p + "wqkv" in self.w:
            with self.scope("norm"):
                qkv = self._norm_linear(x, p + "attn_norm", p + "wqkv", p + "bqkv", w=ahead)
            with self.scope("qkv"):
                return self._qkv_ahead(p, positions, qkv, ahead)
        with self.scope("norm"):
            h = self._norm(x, p + "attn_norm")
        with self.scope("qkv"):
            return self._qkv(h, p, positions)

    def _block_out(self, x, o, p: str):
        """Post-attention of one block: output projection and the MLP, each with its residual. The MLP's first
        layer (one product) runs inside the norm's last rounds (``_norm_linear``)."""
        with self.scope("attn_out"):
            x = x + self._linear(o, p + "wo", p + "bo")
        first = self._mlp_in(p)
        if first is not None:
            with self.scope("norm"):
                a = self._norm_linear(x, p + "mlp_norm", *first)
            with self.scope("mlp"):
                return x + self._mlp(None, p, a)
        with self.scope("norm"):
            h = self._norm(x, p + "mlp_norm")
        with self.scope("mlp"):
            return x + self._mlp(h, p)

    def _qkv(self, h, p: str, positions: torch.Tensor, qkv=None):
        """q, k, v (heads, T, hd) after RoPE, from the normalised row ``h`` or from the fused product ``qkv``."""
        cfg = self.cfg
        H, Hkv, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        if qkv is None and p + "wqkv" in self.w:  # fused (generation.FUSED_WEIGHTS): one product, one opening of h
            qkv = self._linear(h, p + "wqkv", p + "bqkv")
        if qkv is not None:
            q, k, v = qkv[..., : H * hd], qkv[..., H * hd : (H + Hkv) * hd], qkv[..., (H + Hkv) * hd :]
        else:
            q, k, v = (self._linear(h, p + n, p + b) for n, b in (("wq", "bq"), ("wk", "bk"), ("wv", "bv")))
        T = q.shape[0]
        q = q.reshape(T, H, hd).transpose(0, 1)
        k = k.reshape(T, Hkv, hd).transpose(0, 1)
        v = v.reshape(T, Hkv, hd).transpose(0, 1)
        if cfg.arch == "llama":
            cos, sin = rope_tables(positions, hd, cfg.rope_theta)
            q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
        return q, k, v

    #: decode rows (one query, no mask) offset the secure softmax's exp by the max of these public columns (the
    #: first rows of the attended cache: attention sinks; the last: the newest rows) instead of the row's max
    #: (mpcache.mpc.softmax: constant rounds, no max tree over the cache); None = the max over the row.
    #: Over a policy's selection the same offset is used only when the selection always attends those very cache
    #: rows (:meth:`selection_anchor`): the attended row is then a subset of the full row with the same anchors, so
    #: its excess over the anchors (what the anchored softmax's range limits, ops.ANCHOR_MAX_EXCESS) is at most the
    #: full cache's; otherwise (e.g. a selection whose last columns are older blocks) the row max is used.
    #: (4, 4): 8 columns, one comparison layer of cmp + 3 rounds (12 columns took + 4). Measured on SmolLM2 passkey
    #: decode rows (2 seeds x 3 depths, every layer and head; experiments/anchor_excess.py): the excess D = row max
    #: - anchors' max has the same distribution as with (4, 8) -- max 8.96 / 17.30, 99th percentile 4.80 / 5.42,
    #: share above the guard's 10: 0 / 0.25% at 1k / 4k tokens -- since the anchors' max is nearly always a sink's
    DECODE_ANCHOR = (4, 4)

    def selection_anchor(self, g, L: int):
        """``DECODE_ANCHOR`` when the Gather ``g`` over an L-row cache attends its first and last anchor rows by
        public range, else None (:func:`mpcache.model.attention.selection_anchor`)."""
        return attention.selection_anchor(self.DECODE_ANCHOR, g, L)

    def _attend(self, q, k, v, mask=None, anchor=None, logw=None):
        """q (H, Tq, hd), k/v (Hkv, Lk, hd) -> out (Tq, H*hd), probs (Hkv, G*Tq, Lk): :func:`attention.attend`."""
        return attention.attend(self.B, self.heads, q, k, v, self.scope, mask=mask, anchor=anchor, logw=logw)

    #: the secure prefill's query blocks: at most PREFILL_ENTRIES scores per query head each (memory ~ 8 B x heads x
    #: that per tensor: 150 MB for SmolLM2's 9 heads), so one block up to 1,448 prompt tokens, 8 at 4k (rounds grow
    #: with the blocks, memory does not); and how many last rows' attention probabilities it keeps for the
    #: policies' static eviction (SnapKV's window 32, MPCache's, TOVA's 1)
    PREFILL_ENTRIES = 1 << 21
    PREFILL_KEEP = 64

    def _causal_attend_secure(self, q, k, v):
        """Secure prefill attention (:func:`attention.attend_causal`): K and V fixed once (fixed_kv: each block's
        products open only its queries and probabilities), query blocks of PREFILL_ENTRIES / T rows, the anchored
        softmax of causal rows. Returns (out, rows(start, end) of the kept last rows, the column sums, (K, V) as
        fixed)."""
        T = int(q.shape[1])
        with self.scope("fix_kv"):
            kf, vf = self._fix_rows([k, v])
        block = max(self.PREFILL_KEEP, self.PREFILL_ENTRIES // T)
        o, tail, colsum = attention.attend_causal(
            self.B, self.heads, q, kf, vf, block, self.PREFILL_KEEP, self.scope, self.DECODE_ANCHOR
        )
        kept = int(tail.shape[1])

        def rows(start: int, end: int):
            if start < T - kept:
                raise ValueError(
                    f"the secure prefill keeps the attention probabilities of the last {kept} query rows; a policy "
                    f"asked for rows {start}..{end} of {T}: raise Transformer.PREFILL_KEEP"
                )
            return tail[:, start - (T - kept) : end - (T - kept)]

        return o, rows, colsum, (kf, vf)

    def _causal_attend_plain(self, q, k, v):
        """Plaintext prefill attention, memory-light: q (H, T, hd), k/v (Hkv, T, hd) -> out (T, H*hd) and
        ``probs(start, end) -> (H, end - start, T)``, the causal probabilities of query rows [start, end), computed
        only when a policy asks. The output is torch's fused causal attention (flash kernel on CPU: no (T, T)
        matrix); same values as :meth:`_attend` up to float rounding."""
        cfg = self.cfg
        H, hd, G = cfg.n_heads, cfg.head_dim, cfg.group_size
        T = int(q.shape[1])
        kx = k.repeat_interleave(G, dim=0) if G > 1 else k  # (H, T, hd): head h reads KV head h // G
        vx = v.repeat_interleave(G, dim=0) if G > 1 else v
        # 4-D contiguous inputs: torch's CPU flash kernel (3-D or strided inputs fall back to the (T, T) math path)
        o = torch.nn.functional.scaled_dot_product_attention(
            q.contiguous()[None],
            kx.contiguous()[None],
            vx.contiguous()[None],
            is_causal=True,
            scale=1.0 / math.sqrt(hd),
        )[0]
        o = o.transpose(0, 1).reshape(T, H * hd)
        scale = 1.0 / math.sqrt(hd)

        def probs(start: int, end: int):
            # keys >= end are in every row's future: score keys [0, end) only, then pad with zero probabilities
            s = (q[:, start:end] * scale) @ kx[:, :end].transpose(1, 2)  # (H, end - start, end)
            future = torch.arange(end, device=s.device)[None, :] > torch.arange(start, end, device=s.device)[:, None]
            p = torch.softmax(s.masked_fill(future, float("-inf")), dim=-1)
            return p if end == T else torch.nn.functional.pad(p, (0, T - end))

        return o, probs

    # ---- passes ------------------------------------------------------------------------------------------
    def _embed(self, tokens, positions: torch.Tensor):
        with self.scope("embed"):
            x = self.B.embedding(self.w["embed"], tokens)
            if self.cfg.arch == "gpt2":
                x = x + self.w["pos_embed"][positions]
        return x

    #: set by :func:`generate` when nothing but the next token is read from the logits (no caller keeps them):
    #: greedy decoding's argmax is the same for r z as for z (r > 0), so an RMSNorm model skips its final norm
    argmax_only = False

    def _logits(self, x):
        """The last position's logits (1, V). With ``argmax_only`` (an RMSNorm model, secure greedy decoding that
        reads only the argmax): x / 2^8 times the head instead -- the logits times 1 / (2^8 r), r the final norm's
        factor > 0, so the same argmax without the norm's 9 rounds (2PC). x / 2^8 keeps the head's products small in the
        ring (as the decode offset's: ``OFFSET_UNIT``) and the values inside the argmax's 32-bit-lane comparison
        (|logit| ||x|| / 2^8 < 2^15: e.g. logits up to 256 at residual norms up to 2^15); measured on SmolLM2 decode
        steps (||x|| up to 1,163), the values reach 113 and stay within 5e-5 of the float model in logit units."""
        cfg = self.cfg
        head = self.w["lm_head"] if "lm_head" in self.w else self.w["embed"].t()
        with self.scope("lm_head"):
            if self.argmax_only and cfg.arch == "llama":
                gain = self.w.get("final_norm.weight")
                unit = self.OFFSET_UNIT if gain is None else gain * (self.OFFSET_UNIT * math.sqrt(cfg.hidden_size))
                return self.B.matmul(x[-1:] * unit, head)
            h = self._norm(x[-1:], "final_norm")
            return self.B.matmul(h, head)  # (1, V)

    def prefill(self, tokens, cache: KVCache):
        """Run the prompt (T tokens) through the model, fill ``cache`` (after the policy's static compaction)
        and return the logits (1, V) of the last position."""
        cfg = self.cfg
        T = len(tokens) if not hasattr(tokens, "shape") else int(tokens.shape[0])
        if T > cfg.max_position:
            raise ValueError(f"prompt of {T} tokens exceeds the model's context of {cfg.max_position}")
        self.policy.check_prompt(T)
        positions = torch.arange(T)
        x = self._embed(tokens, positions)
        # plaintext: fused causal attention, and the probabilities only for the rows a policy reads (a policy
        # that ignores them, e.g. the full cache or Quest, costs nothing); secure: blocked causal attention over
        # keys fixed once per layer (attention.attend_causal), the anchored softmax of causal rows
        plain = not self.B.secure and isinstance(x, torch.Tensor)
        shared: dict = {}
        for i in range(cfg.n_layers):
            p = f"layers.{i}."
            with self.scope(f"L{i}"):
                q, k, v = self._block_in(x, p, positions)
                colsum = None
                if plain:
                    o, probs_fn = self._causal_attend_plain(q, k, v)
                    kf, vf = k, v
                else:
                    o, probs_fn, colsum, (kf, vf) = self._causal_attend_secure(q, k, v)
                x = self._block_out(x, o, p)  # the compaction below does not touch x
                with self.scope("static_eviction"):
                    ctx = PrefillContext(
                        self.B, i, cfg.n_layers, q, k, v, None, cache.state[i], shared, attn_fn=probs_fn, colsum=colsum
                    )
                    g = self.policy.for_layer(i).prefill(ctx)
                    if g is not None:
                        k, v = g.apply(k, self.B), g.apply(v, self.B)
                        cache.logw[i] = g.log_weights()
                    else:
                        k, v = kf, vf  # already fixed for the blocks: the cache keeps them (no second opening)
                cache.k[i], cache.v[i] = k, v
        self._fix_cache(cache)
        cache.n_prompt = cache.length
        cache.pos = T
        return self._logits(x)

    def _fix_rows(self, xs: list) -> list:
        """Cached rows become fixed operands (secure backend, fixed_kv on): their mask is opened once, here, and
        every later product with them opens only its moving operand (plaintext: unchanged)."""
        return self.B.fix_rows(list(xs))

    def _fix_cache(self, cache: KVCache) -> None:
        """End of the prefill: fix every layer's K and V (after the static compaction) in one round."""
        n = self.cfg.n_layers
        with self.scope("fix_kv"):
            fixed = self._fix_rows(cache.k + cache.v)
        cache.k, cache.v = fixed[:n], fixed[n:]

    #: the offset's input scale (``_decode_offset``): the unnormalised row times 2^-8 keeps the offset's products as
    #: small in the ring as the normalised ones (residual norms reach ~2^15 on SmolLM2; a 2PC truncation of a
    #: product near 2^64 x p fails with probability ~p), at ~2^-8 of precision, which an offset does not need
    OFFSET_UNIT = 2.0**-8

    def _offset_ok(self, i: int, cache: KVCache) -> bool:
        """Whether layer ``i``'s decode step makes its anchored softmax's offset beside the norm
        (``_decode_offset``): public facts only -- a backend whose ``parallel`` merges openings (secure 2PC; the
        plaintext backend keeps the plain route, the reference), RMSNorm with no q bias (the scores are then the norm's factor
        times a linear function of the UNnormalised row), a policy with no per-step selection (the full row is
        attended) or whose selection was made ahead (the offset is the full row's anchors' max, kept by the selection's
        gather: attention.selection_anchor), no row weights, and a cache long enough for the anchored softmax."""
        cfg, w, p = self.cfg, self.w, f"layers.{i}."
        a, b = self.DECODE_ANCHOR or (0, 0)
        return (
            self.B.early_offset
            and self.DECODE_ANCHOR is not None
            and cfg.arch == "llama"
            and p + "bq" not in w
            and p + "bqkv" not in w
            and (type(self.policy.for_layer(i)).select is CachePolicy.select or self.policy.for_layer(i).ahead(i))
            and cache.logw[i] is None
            and int(cache.k[i].shape[1]) >= a + b
        )

    def _decode_offset(self, x, p: str, positions: torch.Tensor, K, ahead=None):
        """A decode step's norm and q/k/v, and BESIDE them what its anchored softmax's offset needs (``_offset_ok``):
        the scores are q K^T / sqrt(hd) with q = r u, r = 1/sqrt(sum x^2 + D eps) > 0 and u = RoPE(x W_q) (the gain
        and sqrt(D) folded into W_q), so the max of the anchors' scores is r times the max of u's. One branch
        normalises x with the q/k/v product inside its last rounds (``_norm_linear``: 9 rounds in 2PC) and returns the
        norm's R = 2^8 r; the other makes u from x / 2^8 (1 round, fixed W_q), its products with the anchor rows of
        the cached K (1 round, fixed K) and their max m (one comparison layer: 8 rounds for up to 8 columns in 2PC). The
        offset is m R, one product in the round of the logits (``_fix_and_score``). The anchors are the first a and last
        b - 1 CACHED rows (the new row's own score needs r^2: it is an ordinary, guarded entry). Rounds (2PC,
        lockstep): 10 before the logits' round (the norm's, and the side's 1 + 1 + 8 at (4, 4)), against
        10 + 1 + 1 + 1 + 8 (norm, q/k/v, new row, logits, the anchors' max) -- the softmax then starts from the
        offset. Bytes: + |x| + G H_kv hd (the two openings) + the comparison layer over (a + b - 1) columns per
        query head + 1 product. The offset differs from the anchors'
        exact max by ~2^-8 relative (x / 2^8 in fixed point): the softmax is the same function for any offset; only
        its range moves by as much. Leakage: none (shapes and the schedule are public). Returns (q, k, v, m, R), and
        ``ahead`` (:meth:`_ahead_weight`): the next layer's query too, from the q/k/v product (q, k, v, m, R, q_next)."""
        cfg, B = self.cfg, self.B
        H, Hkv, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        G, (a, b), L = H // Hkv, self.DECODE_ANCHOR, int(K.shape[1])
        gain = self.w.get(p + "attn_norm.weight")
        xs = x * self.OFFSET_UNIT if gain is None else x * (self.OFFSET_UNIT * math.sqrt(cfg.hidden_size) * gain)
        wq = self.w[p + "wqkv"][:, : H * hd] if p + "wqkv" in self.w else self.w[p + "wq"]
        cos, sin = rope_tables(positions, hd, cfg.rope_theta)
        anchors = B.cat([K[:, :a], K[:, L - b + 1 :]], dim=1).transpose(1, 2)  # (Hkv, hd, a + b - 1)
        out: dict = {}

        def norm():
            if p + "wqkv" in self.w:
                qkv, out["r"] = self._norm_linear(x, p + "attn_norm", p + "wqkv", p + "bqkv", scale=True, w=ahead)
                out["qkv"] = self._qkv_ahead(p, positions, qkv, ahead)
            else:
                n, out["r"] = self._norm(x, p + "attn_norm", scale=True)
                out["qkv"] = self._qkv(n, p, positions)

        def side():
            with self.scope("offset"):
                u = self._rope(B.matmul(xs, wq).reshape(1, H, hd).transpose(0, 1), cos, sin)
                s = B.matmul((u * (1.0 / math.sqrt(hd))).reshape(Hkv, G, hd), anchors)
                out["m"] = B.anchor_max(s)  # (Hkv, G, 1), in units of x / 2^8

        with self.scope("norm"):
            B.parallel(norm, side)
        q, k, v, *q_next = out["qkv"]
        return (q, k, v, out["m"], out["r"], *q_next)

    def _ahead_query(self, x, j: int, positions: torch.Tensor):
        """Layer ``j``'s query (H, 1, hd) made from ``x``, the input of layer j - 1 instead of layer j's own (the
        residual stream one block earlier): norm with layer j's gain, layer j's W_q (+ bias), RoPE (a selection made
        ahead, CachePolicy.ahead). The secure route with folded gains makes the same value inside layer j - 1's
        q/k/v product instead (:meth:`_ahead_weight`)."""
        cfg, p = self.cfg, f"layers.{j}."
        H, hd = cfg.n_heads, cfg.head_dim
        h = self._norm(x, p + "attn_norm")
        if p + "wqkv" in self.w:
            q = self.B.matmul(h, self.w[p + "wqkv"][:, : H * hd])
            if p + "bqkv" in self.w:
                q = q + self.w[p + "bqkv"][: H * hd]
        else:
            q = self._linear(h, p + "wq", p + "bq")
        return self._rope_q(q, positions)

    def _qkv_ahead(self, p: str, positions: torch.Tensor, qkv, ahead):
        """q, k, v from the fused product's output ``qkv``, and with ``ahead`` (it was the :meth:`_ahead_weight`) the
        next layer's query from its last columns: (q, k, v) or (q, k, v, q_next)."""
        if ahead is None:
            return self._qkv(None, p, positions, qkv)
        n = int(self.w[p + "wqkv"].shape[-1])
        return (*self._qkv(None, p, positions, qkv[..., :n]), self._rope_q(qkv[..., n:], positions))

    def _rope_q(self, q, positions: torch.Tensor):
        """(1, H*hd) query projections -> (H, 1, hd) after RoPE (llama)."""
        cfg = self.cfg
        H, hd = cfg.n_heads, cfg.head_dim
        q = q.reshape(1, H, hd).transpose(0, 1)
        if cfg.arch != "llama":
            return q
        cos, sin = rope_tables(positions, hd, cfg.rope_theta)
        return self._rope(q, cos, sin)

    def _ahead_weight(self, i: int):
        """Layer ``i``'s fused q/k/v weight extended by layer i + 1's W_q columns, when the two layers'
        norm gains are folded into their weights (the secure path: weights.fold_norm_gains) and neither has a q/k/v
        bias: then layer i + 1's query from layer i's input is layer i's normalised row times layer i + 1's W_q, so it
        rides in layer i's product (bytes: the extra outputs; no opening of its own). None otherwise (the query is
        made by :meth:`_ahead_query`). Built once per model: a concatenation of fixed operands, no traffic."""
        p, nxt, H, hd = f"layers.{i}.", f"layers.{i + 1}.", self.cfg.n_heads, self.cfg.head_dim
        w = self.w
        if not (
            self.B.secure
            and self.cfg.arch == "llama"
            and p + "wqkv" in w
            and nxt + "wqkv" in w
            and p + "attn_norm.weight" not in w
            and nxt + "attn_norm.weight" not in w
            and p + "bqkv" not in w
            and nxt + "bqkv" not in w
        ):
            return None
        cache = self.__dict__.setdefault("_ahead_ws", {})
        if i not in cache:
            cache[i] = self.B.cat([w[p + "wqkv"], w[nxt + "wqkv"][:, : H * hd]], dim=1)
        return cache[i]

    def _fix_and_score(self, q, k, v, K, m, r, g=None, V=None):
        """The new row's fixing, the step's logits and the offset in ONE round (after ``_decode_offset``): q K^T
        over the cached rows (fixed K: opens q), q . k for the new row (a product of two shares: opens q and k), the
        fixing of the new k and v (opens their masks) and the offset m R (``_decode_offset``) are independent
        openings, in lockstep -- instead of the fixing, then q K^T over the cache with the new row. Same logits
        (Hkv, G, L + 1); bytes + |q| + |k| G. ``g``: a selection made ahead (CachePolicy.ahead) whose attention takes
        the three-operand route (``B.gathered_ok``): its selected rows' scores (``B.gather_scores``: opens the
        one-hot and q) ride in the same round. Returns (k, v) fixed, the logits, the offset (Hkv, G, 1) and the
        gathered scores (None without ``g``)."""
        B, heads = self.B, self.heads
        Hkv, G, hd = heads.n_kv_heads, heads.group_size, heads.head_dim
        qg = (q * (1.0 / math.sqrt(hd))).reshape(Hkv, G, hd)
        pre = g is not None and g.onehot is not None and B.gathered_ok(g, K, V) and g.covers(int(K.shape[1]) + 1)
        with self.scope("qk"):
            fixed, old, new, offset, *scores = B.parallel(
                lambda: self._fix_rows([k, v]),
                lambda: B.matmul(qg, K.transpose(1, 2)),
                lambda: (qg * k).sum(dim=-1, keepdim=True),  # k (Hkv, 1, hd): the new row, over the group's heads
                lambda: m * r,
                *([lambda: B.gather_scores(qg, g, K)] if pre else []),
            )
        return fixed[0], fixed[1], B.cat([old, new], dim=-1), offset, (scores[0] if scores else None)

    def _select(self, cache: KVCache, i: int, q, shared: dict, ahead: bool = False) -> Selection:
        """Layer ``i``'s policy selection for this decode step from the query ``q`` (H, 1, hd). ``ahead``: made before
        the layer writes its new row (``q`` then is the query made ahead: CachePolicy.ahead)."""
        rows = int(cache.k[i].shape[1]) + 1 if ahead else None
        ctx = DecodeContext(
            self.B,
            i,
            self.cfg.n_layers,
            q[:, 0],
            cache.k[i],
            cache.v[i],
            cache.n_prompt,
            cache.state[i],
            shared,
            anchor=self.DECODE_ANCHOR,
            ahead=ahead,
            rows=rows,
        )
        return as_selection(self.policy.for_layer(i).select(ctx))

    def _decode_attention(self, q, sel, k, v, logw=None):
        """A decode step's attention over the policy's :class:`Selection`: the backend chooses the route
        (``Backend.decode_attention``; the routes are in :mod:`mpcache.model.attention`)."""
        return self.B.decode_attention(self.heads, q, sel, k, v, self.scope, anchor=self.DECODE_ANCHOR, logw=logw)

    def decode(self, token, cache: KVCache):
        """One new token (an id, or a one-hot (1, V)) at position ``cache.pos``; returns logits (1, V)."""
        cfg, B = self.cfg, self.B
        if cache.pos >= cfg.max_position:
            raise ValueError(f"position {cache.pos} exceeds the model's context of {cfg.max_position}")
        positions = torch.tensor([cache.pos])
        x = self._embed(token if hasattr(token, "shape") else [token], positions)
        n = cfg.n_layers
        # this layer's Selection, made beside the previous layer (CachePolicy.ahead); layer 0's beside the previous
        # decode step's last layer, from that step's layer-0 query (None at the first decode step: made here)
        ahead_sel, shared = cache.ahead0 or (None, {})
        cache.ahead0, next_shared = None, {}
        wrap0 = self.policy.for_layer(0).ahead(0)
        q0 = None
        for i in range(n):
            p = f"layers.{i}."
            with self.scope(f"L{i}"):
                nxt = self.policy.for_layer(i + 1).ahead(i + 1) if i + 1 < n else wrap0 and q0 is not None
                aw = self._ahead_weight(i) if nxt and i + 1 < n else None
                g = None if ahead_sel is None else ahead_sel.gather
                offset = logits = pre = None
                if self._offset_ok(i, cache):
                    q, k, v, m, r, *qn = self._decode_offset(x, p, positions, cache.k[i], aw)
                    k, v, logits, offset, pre = self._fix_and_score(q, k, v, cache.k[i], m, r, g, cache.v[i])
                else:
                    q, k, v, *qn = self._block_in(x, p, positions, aw)
                    with self.scope("fix_kv"):
                        k, v = self._fix_rows([k, v])  # the new row's mask is opened once, when written
                if i == 0:
                    q0 = q

                def rest(i=i, p=p, x=x, q=q, k=k, v=v, offset=offset, logits=logits, pre=pre, made=ahead_sel):
                    cache.k[i] = B.cat([cache.k[i], k], dim=1)
                    cache.v[i] = B.cat([cache.v[i], v], dim=1)
                    if cache.logw[i] is not None:  # the new row stands for itself: weight 1
                        cache.logw[i] = torch.cat([cache.logw[i], torch.zeros(1)])
                    sel = made
                    if sel is None:
                        with self.scope("selection"):
                            sel = self._select(cache, i, q, shared)
                    if offset is not None:  # the offset made beside the norm (_offset_ok), the logits of every row
                        sel = Selection(sel.gather, logits, offset, pre)
                    o = self._decode_attention(q, sel, cache.k[i], cache.v[i], cache.logw[i])
                    return self._block_out(x, o, p)

                if not nxt:
                    x, ahead_sel = rest(), None
                    continue

                def ahead(j=(i + 1) % n, x=x, q_next=qn[0] if qn else None, q0=q0, shared=shared):
                    # layer j's selection from the query made at this layer's input (layer 0: this step's layer-0
                    # query, for the next step), beside this layer's attention and MLP: its rounds overlap theirs
                    # (B.parallel); scoped in this layer as "selection_ahead"
                    with self.scope("selection_ahead"):
                        if j == 0:
                            q_j = q0
                        else:
                            q_j = self._ahead_query(x, j, positions) if q_next is None else q_next
                        # layer j writes its new row after this selection; layer 0's shares go to the next step
                        return self._select(cache, j, q_j, next_shared if j == 0 else shared, ahead=True)

                x, ahead_sel = B.parallel(rest, ahead)
                if i == n - 1:
                    cache.ahead0, ahead_sel = (ahead_sel, next_shared), None
        cache.pos += 1
        return self._logits(x)


def generate(model: Transformer, tokens, max_new_tokens: int, reveal_to=None, on_token=None, keep_logits=None):
    """Greedy generation of exactly ``max_new_tokens`` tokens (a public count: no early stop on EOS, which would
    reveal when it appeared).

    ``tokens``: prompt ids (plaintext) or one-hot rows (T, V) (secure). Each step's token comes from
    ``B.next_token(logits, reveal_to)``: under MPC its index is opened to party ``reveal_to`` (the client) alone,
    which feeds its one-hot back as a fresh sharing; elsewhere the token is None. Costs are scoped ``prefill`` (the
    prompt's forward pass) and ``token/t`` (the decode pass that produced token t's logits — none for t = 0 — plus
    its argmax and reveal).
    ``keep_logits(logits) -> tensor`` (tests only) records the logits of every step. Returns (ids, logits list).
    """
    B = model.B
    if keep_logits is None and not B.secure:
        keep_logits = lambda x: x
    model.argmax_only = keep_logits is None  # only the argmax is read (Transformer._logits)
    cache = KVCache(model.cfg.n_layers)
    out, logits_all = [], []
    with model.scope("prefill"):
        logits = model.prefill(tokens, cache)
    oh = None
    for t in range(max_new_tokens):
        with model.scope(f"token/{t}"):
            if t > 0:
                logits = model.decode(oh, cache)
            if keep_logits is not None:
                logits_all.append(keep_logits(logits))
            tok, oh = B.next_token(logits, reveal_to)  # oh: (1, V), the next step's input
        out.append(tok)
        if on_token is not None:
            on_token(t, tok)
    return out, logits_all
