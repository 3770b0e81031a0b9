"""H2O (Zhang et al., arXiv:2306.14048): heavy hitters by accumulated attention, plus a recent window."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .base import BudgetPolicy, Gather, PrefillContext, nonempty, register, round_half_up, select_k, sum_groups


@register
@dataclass
class H2OPolicy(BudgetPolicy):
    """Keep the ``recent_ratio`` share of the budget as the most recent prompt tokens and the rest as the tokens
    with the largest accumulated attention (column sums of the prefill attention over all queries, summed over
    the query heads of each KV group).

    Static at the prefill (kvpress convention: one eviction after the prompt, not H2O's per-step greedy
    update), one selection per KV head. Budget: the number of prompt rows kept. The causal mask makes early
    tokens accumulate more attention; that bias is H2O's own.
    """

    name: ClassVar[str] = "h2o"
    recent_ratio: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.recent_ratio <= 1.0:
            raise ValueError(
                f"H2OPolicy.recent_ratio is the share of the budget kept as recent tokens, in [0, 1]; "
                f"got {self.recent_ratio}"
            )

    def _split(self, n: int) -> tuple[int, int]:
        keep = self.kept(n)
        recent = min(keep, round_half_up(self.recent_ratio * keep))
        return keep - recent, recent

    def prefill(self, ctx: PrefillContext) -> Gather | None:
        n = ctx.n
        heavy, recent = self._split(n)
        if heavy + recent >= n:
            return None
        if heavy == 0:
            return Gather(ranges=((n - recent, n),))
        scores = sum_groups(ctx.attn_colsum(), int(ctx.k.shape[0]))[:, : n - recent]  # (Hkv, n - recent)
        onehot, strata = select_k(ctx.backend, scores, heavy, self.topk, ordered=True)
        return Gather(ranges=nonempty((n - recent, n)), onehot=onehot, start=0, block=1, strata=strata)

    def attended_tokens(self, n_prompt: int, step: int = 0) -> int:
        return self.kept(n_prompt) + step + 1
