"""MPCache (Zeng et al., arXiv:2501.06807, NeurIPS 2025): static look-once eviction + clustered dynamic selection.

See /work/shared/mpcache-algorithm.md (the spec) and design.md §2/§5 (public budgets). Differences from the
authors' code, all so that every shape is public:

* Static stage: a fixed public keep count per KV head (top-k of the window attention) instead of the authors'
  dataset-tuned threshold (which reveals a data-dependent count); sinks and the window kept by position.
* Dynamic stage: clusters on a fixed grid of the compacted cache that starts after the sink cluster; only FULL
  clusters that end before the newest ``recent`` rows are candidates, the rows after the last candidate (the
  newest ``recent`` and up to one coarse cluster more) are always attended, so no padding with duplicated keys is
  needed. k1/k2 come from the budget, not fixed ratios.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

from .base import (
    AUTO_RANK_MAX,
    BudgetPolicy,
    DecodeContext,
    Gather,
    PrefillContext,
    Selection,
    nonempty,
    register,
    round_half_up,
    select_k,
    sum_groups,
)
from .clusters import bound_scores, extend, grow, linear_scores, pending

REDUCTIONS = ("max", "mean")
HEAD_REDUCTIONS = ("sum", "max")


class DynamicPlan(NamedTuple):
    """Public sizes of one decode step's selection: ``C1`` candidate coarse clusters (of ``fanout`` fine
    clusters each), top ``k1`` of them; ``C2 = fanout·C1`` candidate fine clusters, top ``k2``; candidates
    cover rows [S2, end)."""

    C1: int
    k1: int
    C2: int
    k2: int
    end: int


def children_onehot(backend, onehot1, fanout: int):
    """(Hkv, k1, C1) one-hot of coarse clusters -> (Hkv, k1·f, C1·f) one-hot of their children, in order.

    Row r·f + j selects fine cluster c·f + j where row r of ``onehot1`` selects c (a public linear map: the
    Kronecker product with the f×f identity, built from copies and zeros, no secure work).
    """
    hkv, k1, c1 = (int(s) for s in onehot1.shape)
    zero = onehot1 * 0
    rows = [backend.stack([onehot1 if jj == j else zero for jj in range(fanout)], dim=3) for j in range(fanout)]
    return backend.stack(rows, dim=2).reshape(hkv, k1 * fanout, c1 * fanout)


@register
@dataclass
class MPCachePolicy(BudgetPolicy):
    """MPCache with a public budget; every optimisation has a switch for ablations.

    Static stage (prefill, per layer and KV head; ``static=False`` disables it): the window is the last
    ``floor(window_fraction·n)`` prompt tokens; a middle token (between the ``sinks`` first tokens and the
    window) is scored by the window's attention (the prefill's probabilities, reused for free), reduced over
    the window queries by ``static_reduce`` ("max": important to any window query, like the authors'
    threshold; "mean": accumulated, like the paper's wording) and summed over the query heads of the KV group.
    The top ``static_keep`` fraction of the middle is kept, in position order; sinks and window by position.
    The static stage never keeps fewer prompt rows than the budget, so ``budget=1.0`` evicts nothing.

    Dynamic stage (every decode step): rows [0, S2) (the sink cluster) and the rows after the last candidate
    coarse cluster are always attended (at least the newest ``recent`` rows: candidates end before them); the full
    coarse clusters of ``fanout·cluster_size`` rows in between are scored against ``alpha·rmax + (1-alpha)·rmin`` (``linear=False``: the exact Quest bound), the top k1
    kept, their children (``cluster_size`` rows) scored and the top k2 attended. One selection per KV head; the
    G query heads of the group are combined by ``head_reduce``: "max" (each head's score, then the max over the
    heads: G·C products and a max over G) or "sum" (the group's queries summed first: C products, the authors'
    MHA code applied to the group). Summaries are made once per cluster (``ctx.state``); a coarse summary is the
    max/min of its children. ``hierarchy=False``: one level over the fine clusters. ``keep_last_cluster``: also
    always attend the last full coarse cluster. ``recent=8`` makes the attended row end with the cache's 8 newest
    rows and start with its 4 sinks (with ``cluster_size >= 4``): the anchors of the secure decode softmax
    (``Transformer.selection_anchor``), so the attention over the selection uses the anchored softmax with the same
    guarantee as the full cache (its excess over the anchors can only be smaller: the same anchors, a subset of
    the row), and the anchors' max is made inside the selection's tournament.

    Layer sharing (``share_layers``): layers < ``share_start`` are independent; after that, groups of
    ``share_group`` consecutive layers reuse their first layer's dynamic Gather (and its static Gather if
    ``share_static``), as in the authors' (2,3), (4,5), ... pairs.

    Selection made ahead (``lookahead``; InfiniGen's speculation, Lee et al., OSDI 2024): layers >=
    ``lookahead_start`` score their clusters with the query the layer would have had at the PREVIOUS layer's input
    (the residual stream one block earlier: layer l's norm gain and W_q applied to layer l - 1's input; layer 0, with
    ``lookahead_start=0``, scores with the previous decode step's layer-0 query, beside that step's last layer; the
    first decode step's layer 0 uses its own). Under MPC
    the query rides in layer l - 1's q/k/v product (layer l's W_q columns appended: no opening of its own) and the
    whole selection runs in lockstep branches beside layer l - 1's attention and MLP (``Transformer.decode``), so its
    rounds leave the critical path: a decode step costs the full cache's rounds plus layer 0's selection. The
    attention's own logits, its anchored offset (beside the norm) and the selected rows' gathered scores (in the
    logits' round) come from the layer's true query, so only WHICH clusters are attended changes.

    Budget = the fraction (or count) of the *full* cache's rows attended per decode step: k2 is chosen so that
    ``S2 + tail + k2·S2`` is nearest to ``kept(n + generated)`` (at least one cluster while any is a candidate),
    and k1 = max(ratio1·C1, ceil(k2 / fanout)). The dynamic ratio is then budget / static fraction.

    Defaults (``static=False``, ``cluster_size=4``, ``fanout=2``, ``head_reduce="max"``, ``share_layers=False``,
    ``topk="auto"`` with ``interleave=True``: the stratified tournament's stratum r holds clusters r, r + k2, r + 2 k2,
    ... so neighbouring clusters -- a needle spans them -- never compete for one winner; ``lookahead=True`` with
    ``lookahead_start=0``: every selection made ahead, off the critical path; the authors' ``alpha=0.6``,
    ``linear=True``, ``hierarchy=True``, ``ratio1=0.5``) were chosen on the dev split only; ``cluster_size=16,
    share_layers=True, head_reduce="sum"`` is the paper's cost point. Why each default, with its dev-split numbers
    and its MPC cost: experiments/RESULTS.md, "MPCachePolicy: why these defaults".
    """

    name: ClassVar[str] = "mpcache"
    # static, look-once eviction
    static: bool = False
    static_keep: float = 0.5
    static_reduce: str = "max"
    window_fraction: float = 0.2
    sinks: int = 4
    # dynamic, clustered selection
    cluster_size: int = 4
    fanout: int = 2
    ratio1: float = 0.5
    alpha: float = 0.6
    linear: bool = True
    hierarchy: bool = True
    keep_last_cluster: bool = False
    recent: int = 8
    head_reduce: str = "max"
    # how the k of m candidate clusters are picked (see base.TOPK_METHODS): MPC-friendly by default
    topk: str = "auto"
    # the stratified selection's strata interleaved (clusters r, r + k2, r + 2 k2, ...: neighbours never compete)
    interleave: bool = True
    # cross-layer index sharing
    share_layers: bool = False
    share_start: int = 2
    share_group: int = 2
    share_static: bool = True
    # selection made ahead (CachePolicy.ahead): layers >= lookahead_start score their clusters with the query made
    # from the previous layer's input (layer 0, with lookahead_start=0: the previous decode step's layer-0 query);
    # under MPC the selection then runs beside the previous layer's attention and MLP, off the critical path
    lookahead: bool = True
    lookahead_start: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        checks = [
            (0.0 <= self.static_keep <= 1.0, f"static_keep must be in [0, 1], got {self.static_keep}"),
            (self.static_reduce in REDUCTIONS, f"static_reduce must be in {REDUCTIONS}, got {self.static_reduce!r}"),
            (0.0 < self.window_fraction < 1.0, f"window_fraction must be in (0, 1), got {self.window_fraction}"),
            (self.sinks >= 0, f"sinks must be >= 0, got {self.sinks}"),
            (self.cluster_size >= 1, f"cluster_size must be >= 1, got {self.cluster_size}"),
            (self.recent >= 0, f"recent must be >= 0, got {self.recent}"),
            (self.fanout >= 2, f"fanout must be >= 2, got {self.fanout} (use hierarchy=False for one level)"),
            (0.0 < self.ratio1 <= 1.0, f"ratio1 must be in (0, 1], got {self.ratio1}"),
            (0.0 <= self.alpha <= 1.0, f"alpha must be in [0, 1], got {self.alpha}"),
            (
                self.head_reduce in HEAD_REDUCTIONS,
                f"head_reduce must be in {HEAD_REDUCTIONS}, got {self.head_reduce!r}",
            ),
            (self.share_start >= 0, f"share_start must be >= 0, got {self.share_start}"),
            (self.share_group >= 1, f"share_group must be >= 1, got {self.share_group}"),
            (
                self.lookahead_start >= 0,
                f"lookahead_start must be >= 0, got {self.lookahead_start}",
            ),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"MPCachePolicy.{msg}")

    # ---- public sizes ------------------------------------------------------------------------------------------
    def leader(self, layer: int) -> int:
        """The layer whose selection ``layer`` reuses (itself when it computes its own)."""
        if not self.share_layers or layer < self.share_start:
            return layer
        return self.share_start + (layer - self.share_start) // self.share_group * self.share_group

    def ahead(self, layer: int) -> bool:
        return self.lookahead and layer >= self.lookahead_start and self.leader(layer) == layer

    def static_plan(self, n: int) -> tuple[int, int, int, int] | None:
        """(sinks, window, middle length m, kept middle k) for an n-token prompt; None = keep everything."""
        if not self.static:
            return None
        w = max(1, math.floor(self.window_fraction * n))
        s = max(0, min(self.sinks, n - w))
        m = n - w - s
        k = min(m, max(round_half_up(self.static_keep * m), self.kept(n) - s - w, 0))
        return None if k >= m else (s, w, m, k)

    def n_static(self, n: int) -> int:
        """Prompt rows left after the static stage."""
        plan = self.static_plan(n)
        return n if plan is None else plan[0] + plan[1] + plan[3]

    def dynamic_plan(self, L: int, L_full: int) -> DynamicPlan | None:
        """Sizes for a compacted cache of L rows whose full cache has L_full rows; None = attend all L rows."""
        S2 = self.cluster_size
        f = self.fanout if self.hierarchy else 1
        target = self.kept(L_full)
        c1 = max(0, (L - S2 - self.recent) // (f * S2))
        c1 -= 1 if self.keep_last_cluster and c1 > 0 else 0
        c2 = f * c1
        k2 = min(c2, max(1, round_half_up((target - (L - c2 * S2)) / S2)))
        if c1 == 0 or target >= L or k2 == c2:
            return None
        k1 = min(c1, max(1, -(-k2 // f), round_half_up(self.ratio1 * c1))) if self.hierarchy else c1
        return DynamicPlan(c1, k1, c2, k2, S2 + c2 * S2)

    def attended_tokens(self, n_prompt: int, step: int = 0) -> int:
        L = self.n_static(n_prompt) + step + 1
        plan = self.dynamic_plan(L, n_prompt + step + 1)
        return L if plan is None else L - (plan.C2 - plan.k2) * self.cluster_size

    # ---- hooks -------------------------------------------------------------------------------------------------
    def prefill(self, ctx: PrefillContext) -> Gather | None:
        n, B = ctx.n, ctx.backend
        ctx.state["mpcache/prompt_len"] = n
        leader = self.leader(ctx.layer)
        key = ("mpcache/static", leader)
        if leader != ctx.layer and self.share_static:
            return ctx.shared[key]
        plan = self.static_plan(n)
        if plan is None:
            g = None
        else:
            s, w, m, k = plan
            ranges = nonempty((0, s), (n - w, n))
            if k == 0:
                g = Gather(ranges=ranges)
            else:
                window = ctx.attn_rows(n - w, n)[:, :, s : s + m]  # (H, w, m)
                # "mean" is computed as the sum: the same ranking, without a fixed-point truncation
                per_head = B.max(window, dim=1) if self.static_reduce == "max" else window.sum(dim=1)
                scores = sum_groups(per_head, int(ctx.k.shape[0]))  # (Hkv, m)
                onehot, strata = select_k(B, scores, k, self.topk, ordered=True)
                g = Gather(ranges=ranges, onehot=onehot, start=s, block=1, strata=strata)
        ctx.shared[key] = g
        return g

    def select(self, ctx: DecodeContext) -> Selection:
        """The leader layer's selection (a follower reuses its Gather), with the attention logits and the anchored
        softmax's offset when the selection made them in its own rounds."""
        leader = self.leader(ctx.layer)
        key = ("mpcache/select", leader)
        if leader != ctx.layer:
            return Selection(ctx.shared[key])
        L = ctx.L
        n_full = ctx.state.get("mpcache/prompt_len", ctx.n_prompt)
        plan = self.dynamic_plan(L, n_full + L - ctx.n_prompt)
        g, offset = (None, None) if plan is None else self._select(ctx, plan)
        ctx.shared[key] = g
        return Selection(g, qk=ctx.qk, offset=offset)

    def _select(self, ctx: DecodeContext, p: DynamicPlan) -> tuple[Gather, object]:
        """(the Gather, the anchored softmax's offset if the tournament made it, else None)."""
        B, S2, f = ctx.backend, self.cluster_size, self.fanout
        hkv, d = int(ctx.k.shape[0]), int(ctx.k.shape[2])
        # scaled like attention logits (q·k / sqrt(d)): the ranking is the same, and the scores stay O(10), far
        # inside the lean comparison's range under MPC
        qg = ctx.q.reshape(hkv, int(ctx.q.shape[0]) // hkv, d) * (1.0 / math.sqrt(d))  # (Hkv, G, D)
        qs = qg.sum(dim=1)  # (Hkv, D)
        alpha = self.alpha if self.linear else None
        keys = ctx.k[:, S2:]
        fkey = f"mpcache/fine{S2}"
        method = self.topk if self.topk != "auto" else ("rank" if p.C2 <= AUTO_RANK_MAX else "strata")
        lockstep = method == "strata" and self.linear
        # the stratified selection scores the first C2 clusters only: a cluster completed later (the newest rows are
        # never candidates) is summarised inside its tournament's comparison layers (ops.strata_select ``also``)
        fine = grow(B, ctx.state, fkey, keys, keys, S2, alpha, upto=p.C2 if lockstep else None)

        def score(mx, mn, rep):
            if not self.linear:
                return bound_scores(B, qg, mx, mn, self.head_reduce)
            if self.head_reduce == "sum":  # (sum of the group's queries) · rep: one product per cluster
                return linear_scores(B, qs, rep)
            return B.max(ctx.query_products(rep), dim=1)  # max over the G heads

        def head(x, c):
            return None if x is None else x[:, :c]

        if method == "strata":  # one level: a tournament over the fine clusters' strata
            rep = head(fine.rep, p.C2)
            if not self.linear:
                onehot, _ = select_k(B, score(head(fine.max, p.C2), head(fine.min, p.C2), rep), p.k2, "strata")
            else:
                # per-head products (one product with [rep | K] on a fixed cache: the attention's logits too);
                # "sum" adds the heads' products (= the summed query's), "max" lets the tournament take the max
                # over the heads (ops.strata_select: no comparison layer of its own)
                prods = ctx.query_products(rep)  # (Hkv, G, C2)
                qk, a = ctx.qk, ctx.anchor
                also = []
                if qk is not None and a is not None and a[0] <= S2 and a[1] <= ctx.L - p.end and not ctx.ahead:
                    # the anchored softmax's offset: the max of the sink rows' and the newest rows' logits, which
                    # this gather always attends (Transformer.selection_anchor), in the tournament's own rounds
                    also = [B.cat([qk[..., : a[0]], qk[..., ctx.L - a[1] :]], dim=-1)]  # (Hkv, G, a + b)
                grown = pending(B, ctx.state, fkey, keys, S2)  # (2, Hkv, new, D, S2)
                extra = also + ([] if grown is None else [grown])
                if self.head_reduce == "sum":
                    onehot, maxes = B.strata_select(
                        prods.sum(dim=1), p.k2, also=extra, interleave=self.interleave, hidden=ctx.ahead
                    )
                else:
                    onehot, maxes = B.strata_select(
                        prods, p.k2, heads=True, also=extra, interleave=self.interleave, hidden=ctx.ahead
                    )
                offset = maxes[0].unsqueeze(-1) if also else None
                if grown is not None:
                    extend(B, ctx.state, fkey, maxes[-1][0], B.neg(maxes[-1][1]), alpha)
            g = Gather(
                ranges=nonempty((0, S2), (p.end, ctx.L)),
                onehot=onehot,
                start=S2,
                block=S2,
                strata=p.C2,
                interleave=self.interleave and self.linear,
            )
            return g, (offset if self.linear else None)
        if not self.hierarchy or p.k1 == p.C1:  # level 1 would keep every coarse cluster: skip it
            scores = score(head(fine.max, p.C2), head(fine.min, p.C2), head(fine.rep, p.C2))
            onehot = B.topk_onehot(scores, p.k2)  # (Hkv, k2, C2)
        else:
            coarse = grow(B, ctx.state, f"mpcache/coarse{S2}x{f}", fine.max, fine.min, f, alpha)
            onehot1 = B.topk_onehot(
                score(head(coarse.max, p.C1), head(coarse.min, p.C1), head(coarse.rep, p.C1)), p.k1
            )  # (Hkv, k1, C1)
            # the chosen clusters' children: one matmul of the one-hot with the fine summaries viewed (C1, f·X)
            if self.linear:
                kids = B.matmul(onehot1, fine.rep[:, : p.C2].reshape(hkv, p.C1, f * d)).reshape(hkv, p.k1 * f, d)
                scores2 = score(None, None, kids)
            else:
                both = B.cat([fine.max[:, : p.C2], fine.min[:, : p.C2]], dim=-1).reshape(hkv, p.C1, f * 2 * d)
                kids = B.matmul(onehot1, both).reshape(hkv, p.k1 * f, 2 * d)
                scores2 = score(kids[..., :d], kids[..., d:], None)
            onehot2 = B.topk_onehot(scores2, p.k2)  # (Hkv, k2, k1·f)
            onehot = B.matmul(onehot2, children_onehot(B, onehot1, f))  # (Hkv, k2, C2)
        return Gather(ranges=nonempty((0, S2), (p.end, ctx.L)), onehot=onehot, start=S2, block=S2), None
