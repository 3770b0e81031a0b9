"""KV-cache policies (kvpress-style dataclasses). Importing this package registers every policy."""
from .base import (
    REGISTRY,
    BudgetPolicy,
    CachePolicy,
    DecodeContext,
    Gather,
    PrefillContext,
    make_policy,
    register,
    resolve_budget,
)
from .h2o import H2OPolicy
from .mpcache import MPCachePolicy
from .quest import QuestPolicy
from .snapkv import SnapKVPolicy
from .streaming import StreamingPolicy
from .tova import TOVAPolicy

__all__ = [
    "REGISTRY",
    "BudgetPolicy",
    "CachePolicy",
    "DecodeContext",
    "Gather",
    "H2OPolicy",
    "MPCachePolicy",
    "PrefillContext",
    "QuestPolicy",
    "SnapKVPolicy",
    "StreamingPolicy",
    "TOVAPolicy",
    "make_policy",
    "register",
    "resolve_budget",
]
