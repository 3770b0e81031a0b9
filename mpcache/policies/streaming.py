"""StreamingLLM (Xiao et al., arXiv:2309.17453): keep the first ``sinks`` tokens and the most recent ones."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .base import BudgetPolicy, Gather, PrefillContext, nonempty, register


@register
@dataclass
class StreamingPolicy(BudgetPolicy):
    """Keep ``sinks`` attention-sink tokens plus the most recent prompt tokens; ``kept(n)`` rows in all.

    Static (decided at the prefill from public positions only, so free under MPC); every generated token is
    kept. Budget: the number of prompt rows kept, sinks included.
    """

    name: ClassVar[str] = "streaming"
    sinks: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sinks < 0:
            raise ValueError(f"StreamingPolicy.sinks must be >= 0, got {self.sinks}")

    def prefill(self, ctx: PrefillContext) -> Gather | None:
        n = ctx.n
        keep = self.kept(n)
        if keep >= n:
            return None
        s = min(self.sinks, keep)
        return Gather(ranges=nonempty((0, s), (n - (keep - s), n)))

    def attended_tokens(self, n_prompt: int, step: int = 0) -> int:
        return self.kept(n_prompt) + step + 1
