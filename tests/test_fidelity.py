"""mpcache.data (Austen lazy-load reader, passkey and continuation tasks) and a smoke run of experiments/fidelity.py."""

from __future__ import annotations

import csv
import importlib.util
import json
import re
import struct
import sys
import zlib
from pathlib import Path

import pytest

from mpcache import data
from mpcache.model.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------------
# A tiny writer of R's XDR serialization (format 3), enough to build a lazy-load database without R.
def _i(x: int) -> bytes:
    return struct.pack(">i", x)


def _flags(t: int, attr=False, tag=False, levels=0) -> bytes:
    return _i(t | (attr << 9) | (tag << 10) | (levels << 12))


def _char(s: str | None) -> bytes:
    if s is None:
        return _flags(9) + _i(-1)
    b = s.encode("utf-8")
    return _flags(9, levels=1 << 3) + _i(len(b)) + b


def _sym(name: str) -> bytes:
    return _flags(1) + _char(name)


def _attrs(d: dict) -> bytes:
    """A pairlist of tagged attributes (symbols after the first written as references: R writes REFSXP)."""
    out = b""
    for tag, value in d.items():
        out += _flags(2, tag=True) + _sym(tag) + value
    return out + _flags(254)


def _str(xs: list, names=None) -> bytes:
    body = _i(len(xs)) + b"".join(_char(x) for x in xs)
    if names is None:
        return _flags(16) + body
    return _flags(16, attr=True) + body + _attrs({"names": _str(names)})


def _int(xs: list) -> bytes:
    return _flags(13) + _i(len(xs)) + b"".join(_i(-(2**31) if x is None else x) for x in xs)


def _vec(items: list, names=None) -> bytes:
    body = _i(len(items)) + b"".join(items)
    if names is None:
        return _flags(19) + body
    return _flags(19, attr=True) + body + _attrs({"names": _str(names)})


def _serialize(item: bytes) -> bytes:
    return b"X\n" + _i(3) + _i(0x040201) + _i(0x030500) + _i(5) + b"UTF-8" + item


def _lazyload_db(base: Path, objects: dict[str, bytes]) -> None:
    """R's makeLazyLoadDB layout: each record = 4-byte length + zlib; .rdx = gzip'd list(variables, ...)."""
    import gzip

    rdb, offsets = b"", []
    for blob in objects.values():
        raw = _serialize(blob)
        rec = struct.pack(">I", len(raw)) + zlib.compress(raw)
        offsets.append((len(rdb), len(rec)))
        rdb += rec
    variables = _vec([_int([o, n]) for o, n in offsets], names=list(objects))
    index = _vec([variables, _vec([]), _flags(10) + _i(1) + _i(1)], names=["variables", "references", "compressed"])
    base.with_suffix(".rdb").write_bytes(rdb)
    base.with_suffix(".rdx").write_bytes(gzip.compress(_serialize(index)))


def test_lazyload_db_and_austen_books(tmp_path, monkeypatch):
    books = {
        name: ["TITLE " + name.upper(), "", f"First  line of {name},", "wrapped here.", "", None, "Second."]
        for name in data.AUSTEN_BOOKS
    }  # None: an NA line reads as a blank one
    root = tmp_path / "root"
    db = root / data._AUSTEN_DB
    db.parent.mkdir(parents=True)
    _lazyload_db(db, {name: _str(lines) for name, lines in books.items()})
    got = data.read_lazyload_db(db)
    assert set(got) == set(books) and list(got["emma"]) == books["emma"]

    # the whole austen_books() path without apt: the package "download" is the folder built above
    monkeypatch.setenv("MPCACHE_CACHE", str(tmp_path / "cache"))
    calls = []
    monkeypatch.setattr(data, "fetch_deb", lambda pkg, dest: calls.append(pkg) or root)
    text = data.austen_books()
    assert calls == [data.AUSTEN_PACKAGE]
    assert text["emma"] == "TITLE EMMA\n\nFirst line of emma, wrapped here.\n\nSecond."  # reflowed, single spaces
    assert data.austen_books() == text and calls == [data.AUSTEN_PACKAGE]  # second call: from the .txt cache
    assert (tmp_path / "cache" / "text" / "janeaustenr" / "emma.txt").is_file()
    assert data.austen_text().startswith("TITLE SENSESENSIBILITY")  # publication order


def test_fetch_deb_without_apt_says_what_to_run(tmp_path, monkeypatch):
    monkeypatch.setattr(data.shutil, "which", lambda tool: None)
    with pytest.raises(RuntimeError, match="apt-get download r-cran-janeaustenr"):
        data.fetch_deb("r-cran-janeaustenr", tmp_path)


# ---------------------------------------------------------------------------------------------------------
def _filler(n_paragraphs: int = 400) -> str:
    words = [
        "the",
        "of",
        "and",
        "to",
        "a",
        "in",
        "was",
        "her",
        "it",
        "she",
        "that",
        "not",
        "be",
        "he",
        "his",
        "as",
        "had",
        "with",
        "for",
        "you",
    ]
    paras = []
    for p in range(n_paragraphs):
        sents = [
            " ".join(words[(p * 7 + s * 3 + i) % len(words)] for i in range(4 + (p + s) % 9)).capitalize() + "."
            for s in range(3)
        ]
        paras.append(" ".join(sents))
    return "\n\n".join(paras)


@pytest.mark.parametrize("n", [600, 1500])
@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.9, 1.0])
def test_passkey_prompt_length_and_depth(n, depth):
    tok = Tokenizer.byte_level()
    s = data.passkey_sample(tok, _filler(), n, depth, key=71432, seed=3)
    assert n - max(4, n // 100) <= len(s.prompt_ids) <= n
    assert tok.decode(s.answer_ids) == "71432"
    text = tok.decode(s.prompt_ids)
    assert text.startswith("<|im_start|>user\n") and text.endswith("<|im_start|>assistant\nThe pass key is ")
    assert "What is the pass key?" in text
    needle = tok.decode(s.prompt_ids[s.needle_start : s.needle_end])
    assert needle.strip() == "The pass key is 71432. Remember it. 71432 is the pass key."
    assert s.hay_start <= s.needle_start < s.needle_end <= s.hay_end
    assert abs(s.depth - depth) < 0.06  # sentence granularity
    ids, ans = data.passkey_prompt(tok, _filler(), n, depth, 71432, 3)
    assert ids == s.prompt_ids and ans == s.answer_ids


def test_passkey_seeds_and_regions():
    dev, ev = data.passkey_cases("dev", 20), data.passkey_cases("eval", 20)
    assert not {c.seed for c in dev} & {c.seed for c in ev}
    assert all(10_000 <= c.key <= 99_999 for c in dev + ev) and data.passkey_cases("eval", 20) == ev
    text = _filler()
    d, e = data.split_text(text, "dev"), data.split_text(text, "eval")
    assert d + "\n\n" + e == text and 0.15 < len(d) / len(text) < 0.25
    tok = Tokenizer.byte_level()
    a = data.passkey_sample(tok, e, 800, 0.5, 12345, seed=0)
    b = data.passkey_sample(tok, e, 800, 0.5, 12345, seed=1)
    assert a.prompt_ids != b.prompt_ids  # the seed moves the filler
    with pytest.raises(ValueError):
        data.passkey_cases("test", 3)


def test_continuation_task():
    tok = Tokenizer.byte_level()
    text = _filler()
    ctx, cont = data.continuation_task(tok, text, 300, 40, offset=5000)
    assert len(ctx) == 300 and len(cont) == 40
    assert tok.decode(ctx + cont) in text
    assert re.match(r"[A-Z]", tok.decode(ctx))  # starts at a paragraph
    ctx2, cont2 = data.continuation_task(tok, text, 300, 40, offset=len(text) - 10)  # wraps around
    assert len(ctx2) == 300 and len(cont2) == 40


def test_passkey_answer_tokens_smollm2():
    """With SmolLM2's tokenizer digits are single tokens, and "...is " + key tokenizes as prompt + key."""
    pytest.importorskip("gguf")
    try:
        from mpcache.model.weights import load_model

        _, _, tok = load_model("smollm2")
    except (ImportError, FileNotFoundError) as e:
        pytest.skip(f"SmolLM2 not available: {e}")
    s = data.passkey_sample(tok, _filler(), 1024, 0.5, 90817, seed=0)
    assert len(s.answer_ids) == 5 and tok.decode(s.answer_ids) == "90817"
    assert tok.encode(tok.decode(s.prompt_ids) + "90817") == s.prompt_ids + s.answer_ids
    assert 1024 - 10 <= len(s.prompt_ids) <= 1024
    assert tok.decode(s.prompt_ids).startswith("<|im_start|>system\n")


# ---------------------------------------------------------------------------------------------------------
def _load_fidelity():
    spec = importlib.util.spec_from_file_location("_experiments_fidelity", REPO / "experiments" / "fidelity.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the file runs
    spec.loader.exec_module(mod)
    return mod


def test_agreement_and_aggregate():
    fid = _load_fidelity()
    assert fid._agreement([1, 2, 3, 4], [1, 2, 0, 4]) == (0.5, 0.75)
    cell = {"length": 8, "policy": "p", "budget": 0.1, "task": "text", "seed": 0, "depth": ""}
    rows = [{**cell, "metric": "nll", "value": v} for v in (1.0, 3.0)]
    res = {r["metric"]: r for r in fid.aggregate(rows)}
    assert res["nll"]["value"] == 2.0 and abs(res["ppl"]["value"] - 2.718281828**2) < 1e-6


def test_fidelity_smoke(tmp_path):
    fid = _load_fidelity()
    text = tmp_path / "text.txt"
    text.write_text(_filler(), encoding="utf-8")
    run = fid.main(
        [
            "--model",
            "tiny-llama",
            "--lengths",
            "320,480",
            "--budgets",
            "0.25,0.5",
            "--policies",
            "full,streaming",
            "--depths",
            "0.3,0.8",
            "--samples",
            "2",
            "--gen-tokens",
            "6",
            "--ppl-tokens",
            "5",
            "--text",
            str(text),
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert run.parent == tmp_path / "out"
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["knobs"]["policies"] == ["full", "streaming"] and len(cfg["passkey_cases"]) == 2
    assert "commit" in cfg["git"] and "finished" in cfg
    with open(run / "results.csv") as f:
        res = list(csv.DictReader(f))
    cell = {(r["length"], r["policy"], r["budget"], r["metric"]): float(r["value"]) for r in res}
    for length in ("320", "480"):
        assert cell[(length, "full", "", "gen_agree")] == 1.0
        assert cell[(length, "full", "", "gen_agree_prefix")] == 1.0
        for b in ("0.25", "0.5"):
            for m in ("passkey_exact", "passkey_token_acc", "gen_agree", "gen_agree_prefix"):
                assert 0.0 <= cell[(length, "streaming", b, m)] <= 1.0
            assert cell[(length, "streaming", b, "ppl")] > 1.0
            assert abs(cell[(length, "streaming", b, "attended_frac")] - float(b)) < 0.05
        assert (length, "streaming", "0.25", "passkey_exact@0.3") in cell
    assert "| 320 | streaming | 0.25 |" in (run / "results.md").read_text()
    assert (run / "passkey_exact.png").stat().st_size > 0 and (run / "gen_agree.png").is_file()
    run2 = fid.main(
        [
            "--model",
            "tiny-llama",
            "--lengths",
            "320",
            "--budgets",
            "0.5",
            "--policies",
            "streaming",
            "--tasks",
            "passkey",
            "--depths",
            "0.5",
            "--samples",
            "1",
            "--text",
            str(text),
            "--out",
            str(tmp_path / "out"),
            "--no-plot",
        ]
    )
    assert run2 != run and (run / "results.csv").is_file()  # a new folder; "full" added as the reference
