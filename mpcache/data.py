"""Real long English text and the quality tasks built from it (passkey retrieval, long-text perplexity).

Text: Jane Austen's six novels (public domain) from the Debian package ``r-cran-janeaustenr``. The package
depends on R, so it is *downloaded, not installed*: ``apt-get download`` + ``dpkg-deb -x`` into a cache folder
(``~/.cache/mpcache/text``, or ``$MPCACHE_CACHE/text``), and the books are read out of R's lazy-load database
``data/Rdata.rdb`` / ``.rdx``: :func:`read_lazyload_db` splits the container (an index and compressed
records), the ``rdata`` library unserializes the R objects in it. The plain text is cached as ``.txt`` files
next to it; it is never part of the repository.

Tasks:

* :func:`passkey_prompt` — needle in a haystack: Austen filler, "The pass key is 71432. ..." inserted at a
  relative depth, "What is the pass key?" in the model's chat template, and the assistant turn opened with
  "The pass key is " so that the answer is exactly the key's tokens (greedy exact match then equals
  teacher-forced argmax being right at every answer token).
* :func:`continuation_task` — n_ctx tokens of text, then n_cont tokens to score (perplexity) or to generate.
* :func:`passkey_cases` / :func:`split_text` — the dev/eval split: disjoint seeds *and* disjoint text regions
  (dev: the first 20% of the text; eval: the rest). Choose defaults on dev, report on eval.
"""

from __future__ import annotations

import bz2
import lzma
import os
import random
import re
import shutil
import struct
import subprocess
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "PasskeyCase",
    "PasskeySample",
    "austen_books",
    "austen_text",
    "cache_dir",
    "continuation_task",
    "fetch_deb",
    "passkey_cases",
    "passkey_prompt",
    "passkey_sample",
    "read_lazyload_db",
    "split_text",
]

AUSTEN_PACKAGE = "r-cran-janeaustenr"
_AUSTEN_DB = "usr/lib/R/site-library/janeaustenr/data/Rdata"
# The package's own order (janeaustenr::austen_books()): publication order.
AUSTEN_BOOKS = ("sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey", "persuasion")


def cache_dir() -> Path:
    """``$MPCACHE_CACHE/text`` if set, else ``~/.cache/mpcache/text`` (created on demand)."""
    root = os.environ.get("MPCACHE_CACHE") or Path.home() / ".cache" / "mpcache"
    d = Path(root) / "text"
    d.mkdir(parents=True, exist_ok=True)
    return d


def fetch_deb(package: str, dest: Path) -> Path:
    """``apt-get download`` one Debian package into ``dest`` and ``dpkg-deb -x`` it to ``dest/root``.

    Does not install anything (no dependencies are pulled). Returns the extracted root folder.
    """
    root = dest / "root"
    if root.is_dir() and any(root.iterdir()):
        return root
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise RuntimeError(
                f"{tool} not found: fetching {package} needs a Debian-like system. On one, run "
                f"`apt-get update && cd {dest} && apt-get download {package} && "
                f"dpkg-deb -x {package}_*.deb root`, or copy an extracted tree to {root}."
            )
    dest.mkdir(parents=True, exist_ok=True)
    debs = sorted(dest.glob(f"{package}_*.deb"))
    if not debs:
        r = subprocess.run(["apt-get", "download", package], cwd=dest, capture_output=True, text=True, check=False)
        debs = sorted(dest.glob(f"{package}_*.deb"))
        if r.returncode != 0 or not debs:
            raise RuntimeError(
                f"`apt-get download {package}` failed (rc={r.returncode}): {r.stderr.strip()[-400:]}"
                f"\nIf the package lists are missing, run `apt-get update` (as root) first."
            )
    tmp = Path(tempfile.mkdtemp(dir=dest))  # extract then rename, so a killed run leaves no half tree behind
    subprocess.run(["dpkg-deb", "-x", str(debs[-1]), str(tmp)], check=True)
    tmp.rename(root)
    return root


# ---------------------------------------------------------------------------------------------------------
# R's lazy-load database: ``base.rdx`` is a serialized (gzip'd) list(variables = list(name = c(offset, length)),
# references, compressed); each record of ``base.rdb`` is a 4-byte big-endian uncompressed length, [a type byte,]
# and the compressed serialized object. The container is split here; rdata unserializes the objects.
def _unserialize(buf: bytes):
    import rdata  # here, not at the top: it pulls in pandas and xarray (~0.3 s), and the .txt cache needs none

    return rdata.conversion.convert(rdata.parser.parse_data(buf, extension=".rds"))


def _inflate_record(rec: bytes, compressed: int) -> bytes:
    """One lazy-load record: 4-byte big-endian uncompressed length, [type byte,] compressed payload."""
    if not compressed:
        return rec
    n = struct.unpack(">I", rec[:4])[0]
    if compressed in (2, 3):  # R >= 2.10: a type byte says which compressor was used for this record
        kind, body = rec[4:5], rec[5:]
        out = {b"Z": zlib.decompress, b"2": bz2.decompress, b"X": lzma.decompress, b"0": bytes}[kind](body)
    else:
        out = zlib.decompress(rec[4:])
    if len(out) != n:
        raise ValueError(f"lazy-load record inflated to {len(out)} bytes, header says {n}")
    return out


def read_lazyload_db(base: str | Path) -> dict:
    """All variables of an R lazy-load database ``base.rdb`` / ``base.rdx`` as {name: object} (rdata's
    conversion: a character vector is a numpy string array, a named list a dict)."""
    base = Path(base)
    index = _unserialize(base.with_suffix(".rdx").read_bytes())
    compressed = int(index["compressed"][0])
    data = base.with_suffix(".rdb").read_bytes()
    return {
        str(name): _unserialize(_inflate_record(data[offset : offset + length], compressed))
        for name, (offset, length) in index["variables"].items()
    }


# ---------------------------------------------------------------------------------------------------------
def _reflow(lines: list) -> str:
    """Gutenberg lines (hard-wrapped at ~70 columns, blank line between paragraphs) -> one line per paragraph,
    paragraphs separated by a blank line."""
    paras, cur = [], []
    for line in lines:
        line = (line or "").strip()
        if line:
            cur.append(re.sub(r" {2,}", " ", line))
        elif cur:
            paras.append(" ".join(cur))
            cur = []
    if cur:
        paras.append(" ".join(cur))
    return "\n\n".join(paras)


def austen_books() -> dict[str, str]:
    """The six novels as {name: text} (reflowed paragraphs), fetched and cached on first use."""
    d = cache_dir() / "janeaustenr"
    txt = {name: d / f"{name}.txt" for name in AUSTEN_BOOKS}
    if not all(p.is_file() for p in txt.values()):
        d.mkdir(parents=True, exist_ok=True)
        root = fetch_deb(AUSTEN_PACKAGE, d)
        db = read_lazyload_db(root / _AUSTEN_DB)
        missing = [n for n in AUSTEN_BOOKS if n not in db]
        if missing:
            raise ValueError(f"{AUSTEN_PACKAGE}: books {missing} not in the data file (has {sorted(db)})")
        for name in AUSTEN_BOOKS:
            tmp = txt[name].with_suffix(".tmp")
            tmp.write_text(_reflow(db[name]), encoding="utf-8")
            tmp.replace(txt[name])
    return {name: p.read_text(encoding="utf-8") for name, p in txt.items()}


def austen_text() -> str:
    """All six novels in publication order, one string (~4 M characters)."""
    return "\n\n".join(austen_books().values())


def split_text(text: str, split: str, dev_fraction: float = 0.2) -> str:
    """The dev (first ``dev_fraction`` of the text) or eval (the rest) region, cut at a paragraph break."""
    if split not in ("dev", "eval"):
        raise ValueError(f"split must be 'dev' or 'eval', got {split!r}")
    cut = text.find("\n\n", int(len(text) * dev_fraction))
    cut = len(text) if cut < 0 else cut
    return text[:cut] if split == "dev" else text[cut + 2 :]


# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PasskeyCase:
    seed: int  # picks the filler's place in the text
    key: int  # the 5-digit pass key


_SPLIT_SEED_BASE = {"eval": 0, "dev": 100_000}  # disjoint seed ranges


def passkey_cases(split: str, n: int) -> list[PasskeyCase]:
    """``n`` (seed, key) pairs of a split; dev and eval seeds never overlap."""
    if split not in _SPLIT_SEED_BASE:
        raise ValueError(f"split must be 'dev' or 'eval', got {split!r}")
    base = _SPLIT_SEED_BASE[split]
    return [PasskeyCase(base + i, random.Random(f"passkey-{base + i}").randint(10_000, 99_999)) for i in range(n)]


@dataclass(frozen=True)
class PasskeySample:
    prompt_ids: list[int]
    answer_ids: list[int]
    needle_start: int  # token index of the needle's first token in prompt_ids
    needle_end: int
    hay_start: int  # token span of the haystack (filler + needle) in prompt_ids
    hay_end: int
    prompt_text: str

    @property
    def depth(self) -> float:
        """Measured relative depth of the needle in the filler: filler tokens before it / all filler tokens."""
        filler = (self.hay_end - self.hay_start) - (self.needle_end - self.needle_start)
        return (self.needle_start - self.hay_start) / max(1, filler)


_INTRO = "There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it.\n\n"
_QUESTION = "\n\nWhat is the pass key?"
_ANSWER_PREFIX = "The pass key is "


def _needle(key: int) -> str:
    return f"The pass key is {key}. Remember it. {key} is the pass key."


_SENTENCE_END = re.compile(r'(?<!\bMr)(?<!\bMrs)(?<!\bMs)(?<!\bDr)(?<!\bSt)[.!?]["\u201d\']?\s+|\n\n')


def _sentence_cuts(text: str) -> list[int]:
    """Character offsets right after sentence ends (". ", "! ", "? ", paragraph breaks)."""
    return [m.end() for m in _SENTENCE_END.finditer(text)]


def _span_tokens(tokenizer, before: str, span: str) -> tuple[int, int]:
    a = len(tokenizer.encode(before))
    return a, len(tokenizer.encode(before + span))


def passkey_sample(tokenizer, filler_text: str, n_tokens: int, depth: float, key: int, seed: int) -> PasskeySample:
    """A needle-in-a-haystack prompt of ≈ ``n_tokens`` tokens (within a few tokens).

    The filler is a run of ``filler_text`` starting at a seed-chosen paragraph; the needle is inserted at the
    sentence break nearest ``depth`` (0..1) of the filler (Austen's sentences are long: at 1k tokens the needle
    can land up to ~0.08 away from ``depth``; :attr:`PasskeySample.depth` is the measured value). The assistant turn is opened with
    "The pass key is " so ``answer_ids`` are the key's tokens.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    needle = _needle(key)

    def build(filler: str):
        cuts = [0] + _sentence_cuts(filler) + [len(filler)]
        at = min(cuts, key=lambda c: abs(c - depth * len(filler)))
        hay = filler[:at].rstrip() + (" " if at else "") + needle + " " + filler[at:].lstrip()
        hay = hay.strip()
        user = _INTRO + hay + _QUESTION
        prompt = tokenizer.apply_chat_template(user) + _ANSWER_PREFIX
        return prompt, hay, filler[:at].rstrip()

    overhead = len(tokenizer.encode(build("")[0]))
    if n_tokens <= overhead + 8:
        raise ValueError(f"n_tokens={n_tokens} leaves no room for filler (template + needle = {overhead} tokens)")
    paras = [m.end() for m in re.finditer(r"\n\n", filler_text)]
    rng = random.Random(f"filler-{seed}")
    start = rng.choice([0] + paras[: max(1, len(paras) - 1)])
    chunk_ids = tokenizer.encode(filler_text[start : start + 12 * n_tokens + 1000])
    want, best = n_tokens - overhead, None
    for _ in range(8):  # adjust the filler's token budget until the whole prompt lands just under n_tokens
        filler = tokenizer.decode(chunk_ids[: max(want, 0)])
        filler = filler[: filler.rstrip().rfind(" ")].rstrip()  # whole words (the last may end mid-sentence)
        prompt, hay, before_needle = build(filler)
        ids = tokenizer.encode(prompt)
        if len(ids) <= n_tokens and (best is None or len(ids) > len(best[1])):
            best = (prompt, ids, hay, before_needle)
        if best is not None and n_tokens - len(best[1]) <= max(4, n_tokens // 100):
            break
        want += n_tokens - len(ids) - (len(ids) > n_tokens)
    if best is None:
        raise ValueError(f"could not fit a passkey prompt in {n_tokens} tokens")
    prompt, ids, hay, before_needle = best
    ans = tokenizer.encode(prompt + str(key))
    answer_ids = ans[len(ids) :] if ans[: len(ids)] == ids else tokenizer.encode(str(key))
    head = prompt[: prompt.index(hay)]
    hs, he = _span_tokens(tokenizer, head, hay)
    # the space before the needle joins its first token (" The"), so count the prefix without it
    ns, ne = _span_tokens(tokenizer, head + before_needle, (" " if before_needle else "") + needle)
    return PasskeySample(ids, answer_ids, ns, ne, hs, he, prompt)


def passkey_prompt(
    tokenizer, filler_text: str, n_tokens: int, depth: float, key: int, seed: int
) -> tuple[list[int], list[int]]:
    """(prompt_ids, answer_ids) of :func:`passkey_sample`."""
    s = passkey_sample(tokenizer, filler_text, n_tokens, depth, key, seed)
    return s.prompt_ids, s.answer_ids


def continuation_task(tokenizer, text: str, n_ctx: int, n_cont: int, offset: int) -> tuple[list[int], list[int]]:
    """(context_ids, continuation_ids): ``n_ctx`` + ``n_cont`` consecutive tokens of ``text`` starting at the
    first paragraph at or after character ``offset`` (wrapping to the start if the text runs out)."""
    if n_ctx < 1 or n_cont < 1:
        raise ValueError("n_ctx and n_cont must be positive")
    at = text.find("\n\n", offset % max(1, len(text)))
    at = 0 if at < 0 else at + 2
    need = n_ctx + n_cont
    span = 8 * need + 1000
    while True:
        piece = text[at : at + span]
        if at + span > len(text):  # wrap around
            piece += "\n\n" + text[: at + span - len(text)]
        ids = tokenizer.encode(piece)
        if len(ids) >= need:
            return ids[:n_ctx], ids[n_ctx:need]
        if span > 2 * len(text) + 2:
            raise ValueError(f"text is too short for {need} tokens")
        span *= 2
