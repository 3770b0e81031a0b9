"""SnapKV (Li et al., arXiv:2404.14469): prompt tokens ranked by the attention of an observation window."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .base import BudgetPolicy, Gather, PrefillContext, nonempty, register, select_k, sum_groups

POOLINGS = ("avg", "max", "none")


def pool1d(backend, x, kernel: int, mode: str):
    """1-D pooling along the last dim of x (Hkv, m), stride 1, zero padding ``kernel // 2`` on both sides.

    ``"avg"`` returns the window *sum* (avg_pool1d with count_include_pad, times ``kernel``: the same ranking,
    without a fixed-point truncation): additions of shifted slices only, so free under MPC. ``"max"`` is a max
    over ``kernel`` shifted slices (ceil(log2 kernel) comparison layers); zero padding equals -inf padding here
    because attention is >= 0.
    """
    if mode == "none" or kernel == 1:
        return x
    p, m = kernel // 2, int(x.shape[-1])
    zero = x[:, :1] * 0
    xp = backend.cat([zero] * p + [x] + [zero] * p, dim=1)
    shifted = [xp[:, o : o + m] for o in range(kernel)]
    if mode == "max":
        return backend.max(backend.stack(shifted, dim=0), dim=0)
    out = shifted[0]
    for s in shifted[1:]:
        out = out + s
    return out


@register
@dataclass
class SnapKVPolicy(BudgetPolicy):
    """Keep the last ``window`` prompt tokens and the tokens the window's queries attend to most.

    Score of a prefix token = attention from the last ``window`` prompt queries (rows of the prefill's
    probabilities, reused for free), summed over those queries and over the query heads of each KV group, then
    pooled along positions with ``kernel_size`` (SnapKV keeps neighbours of hits). Default ``pooling="avg"``:
    linear, so it costs no communication under MPC; SnapKV's own default is max pooling (``pooling="max"``).
    Static at the prefill, one selection per KV head. Budget: prompt rows kept, window included (the kept
    window shrinks to the budget when the budget is smaller).
    """

    name: ClassVar[str] = "snapkv"
    window: int = 32
    kernel_size: int = 7
    pooling: str = "avg"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.window < 1:
            raise ValueError(f"SnapKVPolicy.window must be >= 1, got {self.window}")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"SnapKVPolicy.kernel_size must be odd and >= 1 (SnapKV uses 7), got {self.kernel_size}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"SnapKVPolicy.pooling must be one of {POOLINGS}, got {self.pooling!r}")

    def prefill(self, ctx: PrefillContext) -> Gather | None:
        n = ctx.n
        keep = self.kept(n)
        if keep >= n:
            return None
        w_keep = min(self.window, keep)
        picked = keep - w_keep
        if picked == 0:
            return Gather(ranges=((n - w_keep, n),))
        w_obs = min(self.window, n)
        m = n - w_keep
        scores = sum_groups(ctx.attn_rows(n - w_obs, n)[:, :, :m].sum(dim=1), int(ctx.k.shape[0]))  # (Hkv, m)
        scores = pool1d(ctx.backend, scores, self.kernel_size, self.pooling)
        onehot, strata = select_k(ctx.backend, scores, picked, self.topk, ordered=True)
        return Gather(ranges=nonempty((m, n)), onehot=onehot, start=0, block=1, strata=strata)

    def attended_tokens(self, n_prompt: int, step: int = 0) -> int:
        return self.kept(n_prompt) + step + 1
