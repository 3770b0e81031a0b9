"""KV-cache policies (kvpress-style dataclasses). Importing this package registers every policy."""

from .balancekv import BalanceKVPolicy
from .base import (
    REGISTRY,
    BudgetPolicy,
    CachePolicy,
    DecodeContext,
    Gather,
    PrefillContext,
    Selection,
    as_selection,
    make_policy,
    register,
    resolve_budget,
)
from .h2o import H2OPolicy
from .mpcache import MPCachePolicy
from .quest import QuestPolicy
from .snapkv import SnapKVPolicy
from .squeeze import SqueezeH2OPolicy, SqueezeMPCachePolicy, SqueezeSnapKVPolicy, SqueezeStreamingPolicy
from .streaming import StreamingPolicy
from .tova import TOVAPolicy

__all__ = [
    "REGISTRY",
    "BalanceKVPolicy",
    "BudgetPolicy",
    "CachePolicy",
    "DecodeContext",
    "Gather",
    "H2OPolicy",
    "MPCachePolicy",
    "PrefillContext",
    "QuestPolicy",
    "Selection",
    "SnapKVPolicy",
    "SqueezeH2OPolicy",
    "SqueezeMPCachePolicy",
    "SqueezeSnapKVPolicy",
    "SqueezeStreamingPolicy",
    "StreamingPolicy",
    "TOVAPolicy",
    "as_selection",
    "make_policy",
    "register",
    "resolve_budget",
]
