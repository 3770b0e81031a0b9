"""Frozen, validated configuration dataclasses shared by the library, the parties and the experiments."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of one decoder-only transformer.

    ``arch`` is ``"llama"`` (RoPE, RMSNorm, SwiGLU, grouped-query attention) or ``"gpt2"`` (learned positions,
    LayerNorm with bias, GeLU MLP, biases on every linear layer). All fields are public in the threat model.
    """

    arch: str
    vocab_size: int
    hidden_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_position: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    name: str = "custom"
    act: str | None = None  # the gpt2 MLP's activation: None (GeLU, tanh form) or "silu" (the MPCache paper's shape)

    def __post_init__(self) -> None:
        if self.arch not in ("llama", "gpt2"):
            raise ValueError(f"ModelConfig.arch must be 'llama' or 'gpt2', got {self.arch!r}")
        if self.act not in (None, "gelu", "silu") or (self.act is not None and self.arch != "gpt2"):
            raise ValueError(f"ModelConfig.act is None, 'gelu' or 'silu' (gpt2 models only), got {self.act!r}")
        for f in (
            "vocab_size",
            "hidden_size",
            "n_layers",
            "n_heads",
            "n_kv_heads",
            "head_dim",
            "intermediate_size",
            "max_position",
        ):
            if int(getattr(self, f)) <= 0:
                raise ValueError(f"ModelConfig.{f} must be positive, got {getattr(self, f)}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.arch == "gpt2" and self.n_kv_heads != self.n_heads:
            raise ValueError("gpt2 models have n_kv_heads == n_heads")

    @property
    def group_size(self) -> int:
        """Query heads per KV head (GQA)."""
        return self.n_heads // self.n_kv_heads

    @property
    def activation(self) -> str:
        """The MLP's nonlinearity: "silu" (llama's SwiGLU gate; gpt2 with ``act="silu"``) or "gelu"."""
        return "silu" if self.arch == "llama" else (self.act or "gelu")

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["act"] is None:  # configs written before the field existed keep their digest
            del d["act"]
        return d

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]
