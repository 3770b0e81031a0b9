"""TOVA (Oren et al., arXiv:2401.06104): keep the tokens the last query attends to most."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .base import BudgetPolicy, Gather, PrefillContext, register, select_k, sum_groups


@register
@dataclass
class TOVAPolicy(BudgetPolicy):
    """Keep the ``kept(n)`` prompt tokens with the largest attention from the last prompt query, averaged over
    the query heads of each KV group (TOVA averages over all heads; under GQA we select per KV head like the
    other policies).

    Static at the prefill (one eviction instead of TOVA's per-step one), every generated token kept. Budget:
    the number of prompt rows kept.
    """

    name: ClassVar[str] = "tova"

    def prefill(self, ctx: PrefillContext) -> Gather | None:
        n = ctx.n
        keep = self.kept(n)
        if keep >= n:
            return None
        scores = sum_groups(ctx.attn_rows(n - 1, n)[:, 0], int(ctx.k.shape[0]))  # (Hkv, n)
        onehot, strata = select_k(ctx.backend, scores, keep, self.topk, ordered=True)
        return Gather(onehot=onehot, start=0, block=1, strata=strata)

    def attended_tokens(self, n_prompt: int, step: int = 0) -> int:
        return self.kept(n_prompt) + step + 1
