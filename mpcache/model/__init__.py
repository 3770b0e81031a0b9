"""Model weights and tokenizers: ``load_model(spec) -> (ModelConfig, weights, Tokenizer)``."""

from mpcache.model.tokenizer import Tokenizer
from mpcache.model.weights import (
    expected_shapes,
    init_random_weights,
    load_model,
    save_safetensors_folder,
    tiny_config,
    validate_weights,
)

__all__ = [
    "Tokenizer",
    "expected_shapes",
    "init_random_weights",
    "load_model",
    "save_safetensors_folder",
    "tiny_config",
    "validate_weights",
]
