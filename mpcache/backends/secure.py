"""Secure backend: the model's op set on CrypTen arithmetic shares (``MPCTensor``).

Same method names and semantics as :class:`mpcache.backends.plain.PlainBackend`; each nonlinear op is a protocol
from :mod:`mpcache.mpc.ops` (cost and leakage stated there), each public/structural op is local. Every op opens
a ledger scope so its bytes and rounds are attributed (``.../softmax``, ``.../topk`` ...).
"""

from __future__ import annotations

import contextlib

import torch

from ..mpc import gather_triple, ops
from ..mpc.config import MpcConfig
from ..mpc.fixed_operand import FixedOperand, fixed_matmul, unfix


class SecureBackend:
    secure = True

    def __init__(self, session=None, fixed_weights: bool = False, fixed_kv: bool | None = None):
        import crypten

        self.crypten = crypten
        self.session = session
        # every protocol knob: the session's (built once from the CLI, in the handshake); else the defaults for the
        # running CrypTen session
        self.cfg: MpcConfig = getattr(session, "cfg", None) or MpcConfig.current()
        # fixed_weights: share_weights wraps the weight matrices in FixedOperand (W - B opened once, offline);
        # matmul/embedding then dispatch to fixed_matmul. matmul_paths counts which path each product took.
        self.fixed_weights = fixed_weights
        # fixed_kv (default: as fixed_weights): cached K/V rows become FixedOperands when written (fix_rows), so
        # q @ K^T, p @ V and the one-hot gathers open only the moving operand (see Transformer.prefill/decode).
        self.fixed_kv = fixed_weights if fixed_kv is None else fixed_kv
        self.matmul_paths: dict[str, int] = {}
        self.reveals: list[tuple[str, int | None, tuple]] = []  # audit trail of every opening (tests read it)
        # where shares live: the session's device; "meta" in a dry run (mpcache.mpc.dryrun: shapes only, no data)
        self.device = torch.device("meta" if getattr(session, "device", None) == "meta" else "cpu")

    def _scope(self, name):
        return self.session.scope(name) if self.session is not None else contextlib.nullcontext()

    # ---- data movement -------------------------------------------------------------------------------------
    def share(self, x: torch.Tensor | None, src: int, shape=None):
        """Secret-share a tensor owned by party ``src`` (other parties pass None and the public ``shape``)."""
        if x is None:
            x = torch.zeros(shape, device=self.device)
        return self.crypten.cryptensor(x.float(), src=src)

    def cat(self, xs: list, dim: int = 0):
        """Concatenate shares. With fixed operands among them (a fixed K/V cache and its pieces): the result is a
        FixedOperand — the pieces that are plain shares (e.g. the rows a one-hot gather picked) are fixed first
        (:meth:`fix_rows`: their ``W - B`` opened, 1 round for all of them), so the attention products that follow
        open only their moving operand. With fixed_kv off, fixed pieces are unwrapped (stock)."""
        if not any(isinstance(x, FixedOperand) for x in xs):
            return self.crypten.cat(xs, dim=dim)
        if not self.fixed_kv:
            return self.crypten.cat([unfix(x) for x in xs], dim=dim)
        loose = [i for i, x in enumerate(xs) if not isinstance(x, FixedOperand)]
        xs = list(xs)
        if loose:
            for i, f in zip(loose, self.fix_rows([xs[i] for i in loose])):
                xs[i] = f
        return FixedOperand.cat(xs, dim=dim)

    def is_fixed(self, x) -> bool:
        """Whether ``x`` is a fixed operand (its mask opened once: products with it open only the other side)."""
        return isinstance(x, FixedOperand)

    def stack(self, xs: list, dim: int = 0):
        return self.crypten.stack([unfix(x) for x in xs], dim=dim)

    def pad_cols(self, x, n: int):
        """``x`` (..., m) padded with zero columns to (..., n): every party pads its share with ring zeros (a valid
        sharing of the public zeros; no traffic)."""
        x = unfix(x)
        out = x.clone()
        out.share = torch.nn.functional.pad(x.share, (0, n - int(x.shape[-1])))
        return out

    def fix_rows(self, xs: list) -> list:
        """Fix shares that later products reuse as their right operand (cached K/V rows): a fresh mask ``B`` each,
        ``W - B`` opened for all of them in one round (:meth:`FixedOperand.fix_many`; bytes ``sum |x| * 8`` per
        party in 2PC). Returns them unchanged when fixed_kv is off."""
        if not self.fixed_kv or not xs:
            return list(xs)
        loose = [i for i, x in enumerate(xs) if not isinstance(x, FixedOperand)]
        out = list(xs)  # already fixed ones (e.g. the prefill's K/V, fixed for its blocks) stay as they are
        if loose:
            with self._scope("fix"):
                for i, f in zip(loose, FixedOperand.fix_many([xs[i] for i in loose])):
                    out[i] = f
        return out

    def embedding(self, table, tokens):
        """Rows of the shared table (V, D) for shared one-hot tokens (T, V): one secret matmul, no index opened."""
        return self._matmul(tokens, table)

    def matmul(self, a, b):
        with self._scope("matmul"):
            return self._matmul(a, b)

    def _matmul(self, a, b):
        # hook: a FixedOperand b (fixed weights) opens only a - mask per use (see mpcache.mpc.fixed_operand)
        a = unfix(a)  # a fixed left operand (e.g. a K row in a policy's product) moves as a share
        path = b.path if isinstance(b, FixedOperand) else "stock"
        self.matmul_paths[path] = self.matmul_paths.get(path, 0) + 1
        return fixed_matmul(a, b) if isinstance(b, FixedOperand) else a.matmul(b)

    # ---- reductions ----------------------------------------------------------------------------------------
    # max/min serve the cache policies (cluster summaries of keys, scores, attention probabilities): values far
    # below the lean comparison's bound (|x| < 16384), so they use it (cfg.policy_lean: 6 rounds / ~25 B per
    # comparison, exact). Their layer radices are the latency-minimising schedule for the call's size (ops.tree_max
    # radix "auto"): a few rows of a leaf cluster take one radix-4 layer (its rounds), the first decode step's
    # summaries of a whole prompt (hundreds of thousands of rows) narrow layers (its bytes: on a mask plan a radix-r
    # layer compares each pair twice).

    def max(self, x, dim: int = -1, keepdim: bool = False):
        x = unfix(x)
        with self._scope("max"):
            return ops.tree_max(
                x,
                dim=dim,
                keepdim=keepdim,
                radix="auto",
                lean=self.cfg.policy_lean,
                cfg=self.cfg,
            )

    def min(self, x, dim: int = -1, keepdim: bool = False):
        return -self.max(-unfix(x), dim=dim, keepdim=keepdim)

    def neg(self, x):
        """-x, exactly (negated shares; local)."""
        return -unfix(x)

    def max_min(self, a, b, dim: int = -1):
        """(max of ``a``, min of ``b``) along ``dim`` (same shapes) in one tournament over the stacked (a, -b):
        the rounds of one max for both."""
        a, b = unfix(a), unfix(b)
        dim = dim % a.dim()
        with self._scope("max"):
            both = ops.tree_max(
                self.crypten.stack([a, -b]),
                dim=dim + 1,
                radix="auto",
                lean=self.cfg.policy_lean,
                cfg=self.cfg,
            )
        return both[0], -both[1]

    # ---- nonlinearities ------------------------------------------------------------------------------------
    def softmax(self, x, dim: int = -1, mask: torch.Tensor | None = None, anchor=None, offset=None):
        """``anchor=(a, b)``: a decode row whose first a and last b columns are always-attended public rows; their
        max is the exp's offset (ops.softmax, ANCHOR): a constant-round softmax, no max over the row."""
        return ops.softmax(x, dim=dim, mask=mask, anchor=anchor, offset=offset, cfg=self.cfg)

    def norm_scale(self, v, add: float = 0.0, scale: bool = False, then=None):
        """v / sqrt(sum(v^2) + add), precise in fixed point (see :func:`mpcache.mpc.ops.norm_scale`); ``scale``:
        also R = 2^8 / sqrt(sum(v^2) + add), in the same rounds; ``then`` (a linear map, e.g. the next layer's
        product): then(v / sqrt(...)) with the map inside the norm's last rounds."""
        with self._scope("rsqrt"):
            return ops.norm_scale(v, add, cfg=self.cfg, scale=scale, then=then)

    def anchor_max(self, x):
        """The anchored softmax's offset: the max over the last dim (kept) of a few anchor columns, in ONE
        comparison layer (``tree_max`` radix "auto": cmp + ceil(log2 m) rounds, 11 for 12 columns; on a mask plan,
        2PC with TFP or the dealer, up to 8 columns: cmp only, 5), the softmax's lean comparison (|x| < 16384)."""
        return ops.tree_max(unfix(x), dim=-1, keepdim=True, radix="auto", lean=self.cfg.softmax_lean, cfg=self.cfg)

    @property
    def merges_branches(self) -> bool:
        """Whether lockstep branches share their rounds (:meth:`parallel`): 2PC with ``cfg.lockstep``. 3PC's
        resharing is point-to-point, not merged: there the branches run one after the other."""
        return self.cfg.lockstep and self.cfg.n_parties == 2

    @property
    def early_offset(self) -> bool:
        """``cfg.early_offset`` where lockstep merges openings (:attr:`merges_branches`). In 3PC the route measured
        +180 rounds per demo token (4,549 vs 4,369)."""
        return self.cfg.early_offset and self.merges_branches

    def parallel(self, *fns) -> list:
        """The branches in lockstep (:func:`mpcache.mpc.lockstep.parallel`): in 2PC each round's openings of all
        branches travel as one exchange (rounds: the longest branch's); ``cfg.lockstep = False``, or 3PC's
        resharing: one after the other. Call it inside a ledger scope: the merged exchanges are counted there."""
        from ..mpc.lockstep import parallel

        return parallel(*fns, enabled=self.cfg.lockstep)

    def silu(self, x, gate=None):
        """SiLU(x), or SiLU(x) * gate (the gated MLP's product in the activation's own rounds: ops.silu)."""
        with self._scope("silu"):
            return ops.silu(x, cfg=self.cfg, gate=gate)

    def gelu(self, x):
        with self._scope("gelu"):
            return ops.gelu(x, cfg=self.cfg)

    # ---- selection -----------------------------------------------------------------------------------------
    def next_token(self, logits, dst: int | None):
        """Greedy decoding's next token, learnt by ``dst`` alone (the client): the tournament's index of the first
        maximum (:func:`mpcache.mpc.ops.argmax_index`: no size-V one-hot is built), opened to ``dst`` only (one
        scalar: 8 B from each other party), then ``dst`` inputs the token's one-hot (1, V) for the next step as a
        fresh sharing of its own value (CrypTen's pseudo-random zero sharing: no traffic). The other parties learn
        nothing (they see one uniform share); ``dst`` learns the token, which it is meant to. Returns (the id on
        ``dst``, None elsewhere; the one-hot share)."""
        import crypten

        with self._scope("argmax"):
            idx = ops.argmax_index(logits, cfg=self.cfg)
        val = self.reveal(idx, dst=dst, label="token")
        tok = None
        if val is not None:
            tok = 0 if val.device.type == "meta" else int(torch.round(val.reshape(-1)[0]).item())  # meta: a dry run
        V = int(logits.shape[-1])
        plain = torch.zeros(1, V, device=logits.share.device)
        if tok is not None and plain.device.type != "meta":
            plain[0, tok] = 1.0
        with self._scope("token_input"):
            oh = crypten.cryptensor(plain, src=dst, precision=0, device=logits.share.device)
        return tok, oh

    def topk_onehot(self, scores, k: int):
        with self._scope("topk"):
            return ops.topk_onehot(scores, k)

    def keep_onehot(self, scores, k: int):
        with self._scope("topk"):
            return ops.keep_onehot(scores, k)

    def strata_top1_onehot(self, scores, k: int):
        with self._scope("topk"):
            return ops.strata_top1_onehot(scores, k, cfg=self.cfg)

    def strata_select(
        self, scores, k: int, heads: bool = False, also=(), interleave: bool = False, hidden: bool = False
    ):
        """ops.strata_select: the stratified top-1 over the max of the group's heads (``heads``) with the maxima of
        ``also`` in the same comparison layers. ``hidden``: the selection runs off the critical path (beside a layer
        whose rounds hide its own): where lockstep merges the branches' openings (2PC), its schedules minimise bytes
        (:data:`~mpcache.mpc.schedules.BYTES_FIRST`); 3PC's resharing runs the branches one after the other, so there
        its rounds count and the schedules stay latency-minimising."""
        from ..mpc.schedules import BYTES_FIRST

        hidden = hidden and self.merges_branches
        with self._scope("topk"):
            oh, maxes = ops.strata_select(
                unfix(scores),
                k,
                heads=heads,
                also=[unfix(t) for t in also],
                cfg=self.cfg,
                interleave=interleave,
                profile=BYTES_FIRST if hidden else None,
            )
            return oh, maxes

    # ---- a decode step's attention: the route ---------------------------------------------------------------------
    def decode_attention(self, heads, q, sel, k, v, scope, anchor=None, logw=None):
        """A one-hot selection over a fixed K/V cache is attended in place (K and V never move; with the
        three-operand products below, :meth:`gathered_ok`, in two rounds): :func:`mpcache.model.attention
        .attend_selected`, reusing the logits and the anchored offset the policy made (``sel.qk``, ``sel.offset``).
        Anything else (no selection, public ranges, a cache that is not fixed) is gathered, then attended."""
        from ..model import attention

        g = sel.gather
        if logw is None and attention.in_place(self, g, k, v):
            return attention.attend_selected(self, heads, q, g, k, v, scope, anchor, sel.qk, sel.offset, sel.scores)
        return attention.gather_and_attend(self, heads, q, sel, k, v, scope, anchor=anchor, logw=logw)

    # ---- attention over a one-hot selection of the fixed cache (mpcache.mpc.gather_triple) ------------------------

    def gathered_ok(self, g, k, v) -> bool:
        """Whether :meth:`gather_scores` / :meth:`gather_values` run for the compact (strata) Gather ``g`` over the
        fixed K and V (else the two-operand route of ``mpcache.model.attention.attend_selected``)."""
        return bool(
            self.cfg.gather_triples
            and g is not None
            and g.onehot is not None
            and g.strata
            and gather_triple.available(k)
            and gather_triple.available(v)
        )

    def gather_scores(self, q, g, k):
        """q (Hkv, G, d) against the rows ``g`` selects of the fixed K: (Hkv, G, k·block) in ``g.apply`` order, and
        the opened one-hot for :meth:`gather_values`. 1 round, opens the one-hot and q (gather_triple)."""
        idx, _ = ops.strata_layout(g.strata, g.n_blocks_selected, g.interleave)
        with self._scope("matmul"):
            oh = gather_triple.OpenedOneHot(unfix(g.onehot))
            return gather_triple.gathered_scores(unfix(q), oh, k, g.start, g.strata, g.block, idx), oh

    def gather_values(self, p_sel, opened, g, v, p_rest=None, ranges=()):
        """p_sel (Hkv, G, k·block) times the selected rows of the fixed V, plus ``p_rest`` times V's rows in the
        public ``ranges`` (in order), in one opening: (Hkv, G, d). 1 round (gather_triple)."""
        idx, _ = ops.strata_layout(g.strata, g.n_blocks_selected, g.interleave)
        rest = None
        if ranges:
            rest = (unfix(p_rest), FixedOperand.cat([v[:, a:b] for a, b in ranges], dim=1))
        with self._scope("matmul"):
            return gather_triple.gathered_values(unfix(p_sel), opened, v, g.start, g.strata, g.block, idx, rest)

    def less_than(self, x, t):
        """[x < t] as a 0/1 share at the usual fixed-point scale, ``t`` public: the sign of x - t by the lean
        comparison (ops._ltz_lean: 6 rounds, ~25 B/element in 2PC; exact while |x - t| < 16384), then the scale-1
        bit's shares times the scale (local, exact), so it mixes with fixed-point shares in cat and products.
        Leaks: shapes only."""
        x = unfix(x)
        with self._scope("cmp"):
            bit = ops._ltz(x - t, self.cfg.policy_lean)
        return ops._from_shares(bit.share * int(x.encoder.scale), precision=None)

    def clamp(self, x, lo: float, hi: float):
        """ops.clamp: min(max(x, lo), hi), public bounds; cmp + 1 rounds, exact. Leaks: shapes only."""
        with self._scope("clamp"):
            return ops.clamp(unfix(x), lo, hi, lean=self.cfg.policy_lean)

    def reveal(self, x, dst: int | None = None, label: str = "value"):
        """Open ``x`` to party ``dst`` (None = everyone). The only way a share becomes plaintext; audited."""
        self.reveals.append((label, dst, tuple(x.shape)))
        with self._scope("reveal"):
            return x.get_plain_text(dst=dst)
