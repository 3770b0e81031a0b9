"""Quest (Tang et al., arXiv:2406.10774): query-aware page selection by an exact per-dimension bound."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from .base import BudgetPolicy, DecodeContext, Gather, nonempty, register, round_half_up, select_k
from .clusters import bound_scores, grow


@register
@dataclass
class QuestPolicy(BudgetPolicy):
    """At every decode step, attend the sink page, the newest rows and the top-k pages by Quest's bound.

    The cache is cut into pages of ``page_size`` rows: page 0 (rows [0, S), the attention sinks) and the rows
    after the last full page are always attended (public ranges); the full pages in between are candidates,
    scored by the exact bound ``sum_i max(q_i·rmax_i, q_i·rmin_i)`` (summed over the query heads of each KV
    group; one selection per KV head). Page summaries are kept incrementally in ``ctx.state``. The MPC-unfriendly
    reference for MPCache's linearised score. Nothing is evicted at the prefill.

    Budget: a fraction (or count) of the L cached rows attended at each step: ``k`` pages are chosen so that
    ``S + tail + k·S`` is the nearest to ``kept(L)`` (at least one page while any is a candidate).
    """

    name: ClassVar[str] = "quest"
    page_size: int = 16

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.page_size < 1:
            raise ValueError(f"QuestPolicy.page_size must be >= 1, got {self.page_size}")

    def plan(self, L: int) -> tuple[int, int, int] | None:
        """(candidate pages C, chosen pages k, end of the candidate rows) for a cache of L rows; None = all."""
        S = self.page_size
        target = self.kept(L)
        C = max(0, (L - S) // S)
        end = S + C * S
        forced = L - C * S
        k = min(C, max(1, round_half_up((target - forced) / S)))
        if C == 0 or target >= L or k == C:
            return None
        return C, k, end

    def select(self, ctx: DecodeContext) -> Gather | None:
        L, S, B = ctx.L, self.page_size, ctx.backend
        plan = self.plan(L)
        if plan is None:
            return None
        C, k, end = plan
        hkv, d = int(ctx.k.shape[0]), int(ctx.k.shape[2])
        keys = ctx.k[:, S:]
        pages = grow(B, ctx.state, f"quest/pages{S}", keys, keys, S)
        q = ctx.q.reshape(hkv, int(ctx.q.shape[0]) // hkv, d) * (1.0 / math.sqrt(d))  # logit scale: same ranking
        scores = bound_scores(B, q, pages.max[:, :C], pages.min[:, :C])  # (Hkv, C)
        onehot, strata = select_k(B, scores, k, self.topk)
        return Gather(ranges=nonempty((0, S), (end, L)), onehot=onehot, start=S, block=S, strata=strata)

    def attended_tokens(self, n_prompt: int, step: int = 0) -> int:
        L = n_prompt + step + 1
        plan = self.plan(L)
        return L if plan is None else L - plan[0] * self.page_size + plan[1] * self.page_size
