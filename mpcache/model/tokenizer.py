"""Tokenizers for the models ``load_model`` returns.

Two kinds behind one class:

* **byte-level** (the tiny random-weight models, and HF folders without ``tokenizer.json``): ids 0..255 are the
  UTF-8 bytes of the text; no special tokens.
* **BPE** (SmolLM2 and HF folders with ``tokenizer.json``): a ``tokenizers.Tokenizer``. For a GGUF file it is
  rebuilt from the file's metadata (``tokenizer.ggml.tokens`` / ``merges`` / ``token_type`` / special ids) as a
  GPT-2 style byte-level BPE.

``apply_chat_template`` implements the ChatML form (``<|im_start|>role\\n...<|im_end|>\\n``) that SmolLM2's
jinja template renders, including the default system prompt that template inserts when the conversation does
not start with a system message. Tests check it against ``transformers``' rendering of the real template.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Iterable
from pathlib import Path

__all__ = ["Tokenizer", "chatml_default_system_prompt"]

# GGUF token types (llama.cpp): 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
_GGUF_CONTROL = 3
_GGUF_USER_DEFINED = 4

_DEFAULT_SYSTEM_RE = re.compile(
    r"messages\[0\]\[['\"]role['\"]\]\s*!=\s*['\"]system['\"].*?<\|im_start\|>system\n(.*?)<\|im_end\|>", re.DOTALL
)


def chatml_default_system_prompt(chat_template: str | None) -> str | None:
    """The system prompt a ChatML jinja template inserts when the first message is not a system message
    (SmolLM2: "You are a helpful AI assistant named SmolLM, trained by Hugging Face"), or None."""
    if not chat_template:
        return None
    m = _DEFAULT_SYSTEM_RE.search(chat_template)
    return m.group(1) if m else None


class Tokenizer:
    """``encode(text) -> list[int]``, ``decode(ids) -> str``, ``bos_token_id``, ``eos_token_id``,
    ``apply_chat_template(user_message) -> str``.

    Build one with :meth:`byte_level`, :meth:`from_gguf_metadata`, :meth:`from_file` or :meth:`from_json`.
    """

    def __init__(
        self,
        backend=None,
        *,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        chat_template: str | None = None,
        chat_format: str = "chatml",
        default_system_prompt: str | None = None,
        name: str = "tokenizer",
    ) -> None:
        if chat_format not in ("chatml", "plain"):
            raise ValueError(f"chat_format must be 'chatml' or 'plain', got {chat_format!r}")
        self._backend = backend  # tokenizers.Tokenizer, or None for byte-level
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.chat_template = chat_template
        self.chat_format = chat_format
        self.default_system_prompt = default_system_prompt
        self.name = name

    # ------------------------------------------------------------------ constructors
    @classmethod
    def byte_level(cls) -> Tokenizer:
        """Ids 0..255 are bytes of the UTF-8 text. No BOS/EOS."""
        return cls(None, name="byte-level")

    @classmethod
    def from_gguf_metadata(cls, meta: dict) -> Tokenizer:
        """Build from GGUF tokenizer metadata: a dict with the ``tokenizer.ggml.*`` keys (already decoded to
        Python values) and optionally ``tokenizer.chat_template``. Only ``tokenizer.ggml.model == 'gpt2'``
        (byte-level BPE) is supported."""
        from tokenizers import AddedToken, decoders, models, pre_tokenizers
        from tokenizers import Tokenizer as _HFTokenizer

        model = meta.get("tokenizer.ggml.model")
        if model != "gpt2":
            raise ValueError(
                f"GGUF tokenizer.ggml.model={model!r} is not supported (only 'gpt2' byte-level BPE); "
                "use an HF folder with tokenizer.json instead"
            )
        tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
        merges_raw: list[str] = list(meta.get("tokenizer.ggml.merges") or [])
        merges = []
        for m in merges_raw:
            a, sep, b = m.partition(" ")
            if not sep:
                raise ValueError(f"malformed GGUF merge entry {m!r} (expected 'left right')")
            merges.append((a, b))
        vocab = {t: i for i, t in enumerate(tokens)}
        if len(vocab) != len(tokens):
            raise ValueError("GGUF vocabulary has duplicate tokens")
        bpe = models.BPE(vocab=vocab, merges=merges, fuse_unk=False)
        tk = _HFTokenizer(bpe)
        pre = meta.get("tokenizer.ggml.pre", "default")
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        if pre == "smollm":
            # SmolLM2's own tokenizer.json (and llama.cpp's "smollm" pre-tokenizer) isolate every digit before the
            # GPT-2 split. transformers' GGUF loader skips the digit split; both agree except on digits that
            # follow two or more spaces (e.g. "a  1"), where this one matches the original tokenizer.
            tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        else:
            if pre not in ("default", "gpt-2", "gpt2"):
                warnings.warn(
                    f"GGUF pre-tokenizer {pre!r} not specifically supported; using the GPT-2 split", stacklevel=2
                )
            tk.pre_tokenizer = byte_level
        tk.decoder = decoders.ByteLevel()
        types = list(meta.get("tokenizer.ggml.token_type") or [])
        if types:
            control = [
                AddedToken(t, special=True, normalized=False)
                for t, ty in zip(tokens, types)
                if int(ty) == _GGUF_CONTROL
            ]
            user = [
                AddedToken(t, special=False, normalized=False)
                for t, ty in zip(tokens, types)
                if int(ty) == _GGUF_USER_DEFINED
            ]
            if control:
                tk.add_special_tokens(control)
            if user:
                tk.add_tokens(user)
        if tk.get_vocab_size(with_added_tokens=True) != len(tokens):
            raise ValueError("internal error: rebuilt GGUF tokenizer grew past the file's vocabulary")
        template = meta.get("tokenizer.chat_template")
        return cls(
            tk,
            bos_token_id=_opt_int(meta.get("tokenizer.ggml.bos_token_id")),
            eos_token_id=_opt_int(meta.get("tokenizer.ggml.eos_token_id")),
            chat_template=template,
            chat_format="chatml",
            default_system_prompt=chatml_default_system_prompt(template),
            name="gguf-bpe",
        )

    @classmethod
    def from_file(
        cls,
        path: str | Path,
        *,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        chat_template: str | None = None,
    ) -> Tokenizer:
        """Load an HF ``tokenizer.json``. Special ids and the chat template come from the arguments, else from a
        ``tokenizer_config.json`` next to it."""
        from tokenizers import Tokenizer as _HFTokenizer

        path = Path(path)
        try:
            tk = _HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a plain Exception
            raise ValueError(f"could not read tokenizer file {path}: {e}. Is it a valid HF tokenizer.json?") from e
        tcfg_path = path.with_name("tokenizer_config.json")
        tcfg: dict = {}
        if tcfg_path.is_file():
            try:
                tcfg = json.loads(tcfg_path.read_text())
            except (OSError, json.JSONDecodeError) as e:
                warnings.warn(f"ignoring unreadable {tcfg_path}: {e}", stacklevel=2)

        def tok_id(key: str) -> int | None:
            v = tcfg.get(key)
            if isinstance(v, dict):
                v = v.get("content")
            return tk.token_to_id(v) if isinstance(v, str) else None

        bos = bos_token_id if bos_token_id is not None else tok_id("bos_token")
        eos = eos_token_id if eos_token_id is not None else tok_id("eos_token")
        template = chat_template if chat_template is not None else tcfg.get("chat_template")
        if not isinstance(template, str):
            template = None
        fmt = "chatml" if (template is None or "<|im_start|>" in template) else "plain"
        if template is not None and fmt == "plain":
            warnings.warn(
                f"chat template of {path.parent} is not ChatML; apply_chat_template will return the message unchanged",
                stacklevel=2,
            )
        return cls(
            tk,
            bos_token_id=bos,
            eos_token_id=eos,
            chat_template=template,
            chat_format=fmt,
            default_system_prompt=chatml_default_system_prompt(template),
            name=str(path),
        )

    # ------------------------------------------------------------------ (de)serialisation for the weight cache
    def to_json(self) -> str:
        return json.dumps(
            {
                "backend": None if self._backend is None else self._backend.to_str(),
                "bos_token_id": self.bos_token_id,
                "eos_token_id": self.eos_token_id,
                "chat_template": self.chat_template,
                "chat_format": self.chat_format,
                "default_system_prompt": self.default_system_prompt,
                "name": self.name,
            }
        )

    @classmethod
    def from_json(cls, s: str) -> Tokenizer:
        from tokenizers import Tokenizer as _HFTokenizer

        d = json.loads(s)
        backend = None if d["backend"] is None else _HFTokenizer.from_str(d["backend"])
        return cls(
            backend,
            bos_token_id=d["bos_token_id"],
            eos_token_id=d["eos_token_id"],
            chat_template=d["chat_template"],
            chat_format=d["chat_format"],
            default_system_prompt=d["default_system_prompt"],
            name=d["name"],
        )

    # ------------------------------------------------------------------ API
    @property
    def is_byte_level(self) -> bool:
        return self._backend is None

    @property
    def vocab_size(self) -> int:
        return 256 if self._backend is None else self._backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; special tokens written in the text (e.g. ``<|im_start|>``) map to their ids.
        No BOS is added."""
        if self._backend is None:
            return list(text.encode("utf-8"))
        return list(self._backend.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids`` (special tokens kept). Invalid UTF-8 byte sequences decode to U+FFFD."""
        ids = [int(i) for i in ids]
        if self._backend is None:
            bad = [i for i in ids if not 0 <= i < 256]
            if bad:
                raise ValueError(f"byte-level tokenizer: ids must be in 0..255, got {bad[:5]}")
            return bytes(ids).decode("utf-8", errors="replace")
        return self._backend.decode(ids, skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        if self._backend is None:
            b = token.encode("utf-8")
            return b[0] if len(b) == 1 else None
        return self._backend.token_to_id(token)

    def apply_chat_template(self, user_message: str, system_prompt: str | None = None) -> str:
        """The prompt text for one user turn followed by the assistant's generation prompt.

        ChatML: ``<|im_start|>system\\n{system}<|im_end|>\\n`` (the explicit ``system_prompt``, else the template's
        default one if it has one) + ``<|im_start|>user\\n{user_message}<|im_end|>\\n<|im_start|>assistant\\n``.
        For the byte-level tokenizer the same text is produced (its markers are then plain bytes).
        """
        if self.chat_format == "plain":
            return user_message if system_prompt is None else f"{system_prompt}\n\n{user_message}"
        system = system_prompt if system_prompt is not None else self.default_system_prompt
        out = "" if system is None else f"<|im_start|>system\n{system}<|im_end|>\n"
        return out + f"<|im_start|>user\n{user_message}<|im_end|>\n<|im_start|>assistant\n"

    def __repr__(self) -> str:
        return (
            f"Tokenizer({self.name!r}, vocab_size={self.vocab_size}, bos={self.bos_token_id}, eos={self.eos_token_id})"
        )


def _opt_int(v) -> int | None:
    return None if v is None else int(v)
