"""Weight loading (GGUF / HF safetensors folders / tiny random configs) and tokenizers.

The ``hf`` tests use transformers as an independent oracle: its GGUF loader (with its own q/k unpermute), its
tokenizer builder, its jinja chat template rendering, and its LlamaForCausalLM / GPT2LMHeadModel forwards. The
reference forwards below are plain torch, written from the standard LLaMA / GPT-2 math, independent of mpcache's
model code.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import time

import pytest
import torch
import torch.nn.functional as F

from mpcache.model import Tokenizer, load_model, save_safetensors_folder
from mpcache.model.weights import expected_shapes, smollm2_gguf_path, validate_weights

torch.set_num_threads(1)

HAS_HF = importlib.util.find_spec("transformers") is not None
hf = [pytest.mark.hf, pytest.mark.skipif(not HAS_HF, reason="transformers (dev extra) not installed")]


def _hf_mark(fn):
    for m in hf:
        fn = m(fn)
    return fn


# ============================================================================ reference forwards (plain torch)
def ref_llama(cfg, w, ids):
    """Standard LLaMA: RMSNorm, RoPE (rotate_half), GQA causal attention, SwiGLU, (tied) lm head."""
    T, H, Hk, hd = len(ids), cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    x = w["embed"][torch.tensor(ids)]
    inv = 1.0 / cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    ang = torch.outer(torch.arange(T, dtype=torch.float64), inv)
    cos, sin = torch.cat([ang.cos()] * 2, -1).float(), torch.cat([ang.sin()] * 2, -1).float()
    mask = torch.full((T, T), float("-inf")).triu(1)

    def rms(v, g):
        return v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * g

    def rope(t):  # (heads, T, hd)
        return t * cos + torch.cat([-t[..., hd // 2 :], t[..., : hd // 2]], -1) * sin

    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        h = rms(x, w[p + "attn_norm.weight"])
        q = rope((h @ w[p + "wq"]).view(T, H, hd).transpose(0, 1))
        k = rope((h @ w[p + "wk"]).view(T, Hk, hd).transpose(0, 1)).repeat_interleave(H // Hk, 0)
        v = (h @ w[p + "wv"]).view(T, Hk, hd).transpose(0, 1).repeat_interleave(H // Hk, 0)
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd) + mask, -1) @ v
        x = x + a.transpose(0, 1).reshape(T, H * hd) @ w[p + "wo"]
        h = rms(x, w[p + "mlp_norm.weight"])
        x = x + (F.silu(h @ w[p + "w_gate"]) * (h @ w[p + "w_up"])) @ w[p + "w_down"]
    x = rms(x, w["final_norm.weight"])
    return x @ (w["embed"].T if cfg.tie_embeddings else w["lm_head"])


def ref_gpt2(cfg, w, ids):
    """Standard GPT-2: learned positions, pre-LayerNorm, MHA with biases, tanh-GeLU MLP, tied lm head."""
    T, H, hd, D = len(ids), cfg.n_heads, cfg.head_dim, cfg.hidden_size
    x = w["embed"][torch.tensor(ids)] + w["pos_embed"][:T]
    mask = torch.full((T, T), float("-inf")).triu(1)

    def ln(v, name):
        return F.layer_norm(v, (D,), w[name + ".weight"], w[name + ".bias"], cfg.norm_eps)

    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        h = ln(x, p + "attn_norm")
        q, k, v = ((h @ w[p + "w" + n] + w[p + "b" + n]).view(T, H, hd).transpose(0, 1) for n in "qkv")
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd) + mask, -1) @ v
        x = x + a.transpose(0, 1).reshape(T, D) @ w[p + "wo"] + w[p + "bo"]
        h = ln(x, p + "mlp_norm")
        a = h @ w[p + "w_fc"] + w[p + "b_fc"]
        a = F.silu(a) if cfg.activation == "silu" else F.gelu(a, approximate="tanh")  # silu: the MPCache paper's
        x = x + a @ w[p + "w_proj"] + w[p + "b_proj"]
    x = ln(x, "final_norm")
    return x @ (w["embed"].T if cfg.tie_embeddings else w["lm_head"])


# ============================================================================ fixtures
@pytest.fixture(scope="module")
def smol_cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("weight_cache")


@pytest.fixture(scope="module")
def smol(smol_cache_dir):
    """SmolLM2 loaded once per module (dequantized from the GGUF; also writes the weight cache)."""
    return load_model("smollm2", cache=smol_cache_dir)


@pytest.fixture(scope="module")
def hf_smol_model():
    """transformers' own GGUF conversion of SmolLM2 into LlamaForCausalLM (fp32). from_pretrained(gguf_file=...)
    needs `accelerate`, which the dev extra does not install; without it we use the same loader function
    from_pretrained calls (load_gguf_checkpoint, which does transformers' own q/k unpermute)."""
    transformers = pytest.importorskip("transformers")
    p = smollm2_gguf_path()
    if importlib.util.find_spec("accelerate") is not None:
        m = transformers.LlamaForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32)
    else:
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        conf = transformers.AutoConfig.from_pretrained(str(p.parent), gguf_file=p.name)
        with torch.device("meta"):
            m = transformers.LlamaForCausalLM(conf)
        sd = load_gguf_checkpoint(str(p), return_tensors=True, model_to_load=m)["tensors"]
        sd = {k: torch.as_tensor(v, dtype=torch.float32) for k, v in sd.items()}
        sd.setdefault("lm_head.weight", sd["model.embed_tokens.weight"])  # tied
        missing, unexpected = m.load_state_dict(sd, strict=False, assign=True)
        assert not unexpected and all("rotary_emb" in k for k in missing), (missing, unexpected)
        m.model.rotary_emb = type(m.model.rotary_emb)(config=conf)  # rebuild the inv_freq buffer off meta
    return m.float().eval()


@pytest.fixture(scope="module")
def hf_smol_tokenizer():
    transformers = pytest.importorskip("transformers")
    p = smollm2_gguf_path()
    return transformers.AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)


# ============================================================================ SmolLM2
def test_smollm2_config_and_shapes(smol):
    cfg, w, tok = smol
    assert (cfg.arch, cfg.hidden_size, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim) == (
        "llama",
        576,
        30,
        9,
        3,
        64,
    )
    assert (cfg.intermediate_size, cfg.vocab_size, cfg.max_position) == (1536, 49152, 8192)
    assert cfg.rope_theta == 100000.0 and cfg.norm_eps == 1e-5 and cfg.tie_embeddings
    assert (cfg.bos_token_id, cfg.eos_token_id) == (1, 2) and tok.eos_token_id == 2
    assert tok.decode([tok.eos_token_id]) == "<|im_end|>"
    validate_weights(cfg, w)
    assert "lm_head" not in w and set(w) == set(expected_shapes(cfg))
    assert sum(t.numel() for t in w.values()) == 134_515_008


def test_smollm2_public_part_reads_no_weights(smol):
    """The non-owners' load: config and tokenizer from the GGUF header only, equal to the full load's."""
    from mpcache.model.weights import load_public, weight_reads

    before = weight_reads()
    cfg, tok = load_public("smollm2")
    assert weight_reads() == before
    assert cfg == smol[0] and tok.to_json() == smol[2].to_json()


def test_smollm2_weight_cache(smol, smol_cache_dir):
    cfg, w, tok = smol
    files = list(smol_cache_dir.glob("*.safetensors"))
    assert len(files) == 1
    t0 = time.perf_counter()
    cfg2, w2, tok2 = load_model("smollm2", cache=smol_cache_dir)
    assert time.perf_counter() - t0 < 10
    assert cfg2 == cfg and all(torch.equal(w[k], w2[k]) for k in w)
    s = "Hello <|im_start|> wörld 123"
    assert tok2.encode(s) == tok.encode(s) and tok2.apply_chat_template("x") == tok.apply_chat_template("x")
    del w2
    # a corrupt cache file is ignored with a warning, and rewritten
    files[0].write_bytes(b"\x00garbage" * 100)
    with pytest.warns(UserWarning, match="weight cache"):
        cfg3, w3, _ = load_model("smollm2", cache=smol_cache_dir)
    assert cfg3 == cfg and all(torch.equal(w[k], w3[k]) for k in w)
    assert files[0].stat().st_size > 500_000_000


@_hf_mark
def test_smollm2_logits_match_hf(smol, hf_smol_model):
    cfg, w, tok = smol
    prompts = [
        tok.encode(tok.apply_chat_template("What is the capital of France?")),
        tok.encode("The quick brown fox jumps over the lazy dog."),
        tok.encode("Ünïcödé 日本語 🙂 1234567"),
    ]
    for ids in prompts:
        with torch.no_grad():
            ours = ref_llama(cfg, w, ids)
            theirs = hf_smol_model(torch.tensor([ids])).logits[0]
        assert (ours - theirs).abs().max().item() < 1e-3
    # the check has teeth: skipping the GGUF q/k unpermute gives clearly different logits
    bad = dict(w)
    for i in range(cfg.n_layers):
        for name, heads in (("wq", cfg.n_heads), ("wk", cfg.n_kv_heads)):
            m = w[f"layers.{i}.{name}"]  # re-apply llama.cpp's permute on the output (column) axis
            bad[f"layers.{i}.{name}"] = m.T.reshape(heads, 2, -1, m.shape[0]).transpose(1, 2).reshape(m.T.shape).T
    with torch.no_grad():
        assert (ref_llama(cfg, bad, prompts[1]) - hf_smol_model(torch.tensor([prompts[1]])).logits[0]).abs().max() > 1


def test_smollm2_answers_paris(smol):
    cfg, w, tok = smol
    ids = tok.encode(tok.apply_chat_template("What is the capital of France?"))
    out = []
    with torch.no_grad():
        for _ in range(8):
            nxt = int(ref_llama(cfg, w, ids + out)[-1].argmax())
            out.append(nxt)
            if nxt == tok.eos_token_id:
                break
    assert "Paris" in tok.decode(out)


TOKENIZER_STRINGS = [
    "Hello, world!",
    "The capital of France is Paris.",
    "  leading spaces\tand\ttabs\n\nnew lines  ",
    "Ünïcödé façade — naïve café 日本語のテキスト 🙂👍🏽",
    "def f(x):\n    return x**2  # comment",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>text<file_sep>more",
    "numbers 3.14159 and 2025-01-01, 1e-5",
    "don't won't I'm we'll they've",
    "",
]


@_hf_mark
def test_tokenizer_matches_hf(smol, hf_smol_tokenizer):
    _, _, tok = smol
    for s in TOKENIZER_STRINGS:
        ours = tok.encode(s)
        assert ours == hf_smol_tokenizer.encode(s, add_special_tokens=False), s
        assert ours == hf_smol_tokenizer.encode(s), s  # SmolLM2 adds no BOS
        assert tok.decode(ours) == s == hf_smol_tokenizer.decode(ours)
    assert tok.encode("<|im_start|>") == [1] and tok.encode("<|im_end|>") == [2]
    for msg in ["What is 2+2?", "Tell me a story\nabout 日本.", ""]:
        jinja = hf_smol_tokenizer.apply_chat_template(
            [{"role": "user", "content": msg}], tokenize=False, add_generation_prompt=True
        )
        assert tok.apply_chat_template(msg) == jinja
        jinja_sys = hf_smol_tokenizer.apply_chat_template(
            [{"role": "system", "content": "Be brief."}, {"role": "user", "content": msg}],
            tokenize=False,
            add_generation_prompt=True,
        )
        assert tok.apply_chat_template(msg, system_prompt="Be brief.") == jinja_sys


def test_tokenizer_digits_isolated(smol):
    """SmolLM2 splits every digit on its own (its tokenizer.json / llama.cpp's 'smollm' pre-tokenizer)."""
    _, _, tok = smol
    ids = tok.encode("a  12")
    assert [tok.decode([i]) for i in ids] == ["a", "  ", "1", "2"]


# ============================================================================ tiny configs + safetensors folders
def test_tiny_configs_and_seeds():
    for spec, arch in (("tiny-llama", "llama"), ("tiny-gpt2", "gpt2")):
        cfg, w, tok = load_model(spec, seed=3)
        assert cfg.arch == arch and cfg.max_position >= 8192 and cfg.vocab_size == 256
        validate_weights(cfg, w)
        assert tok.is_byte_level and tok.eos_token_id is None
        s = "héllo 日本 🙂"
        assert tok.encode(s) == list(s.encode()) and tok.decode(tok.encode(s)) == s
        _, w2, _ = load_model(spec, seed=3)
        _, w3, _ = load_model(spec, seed=4)
        assert all(torch.equal(w[k], w2[k]) for k in w) and not torch.equal(w["layers.0.wq"], w3["layers.0.wq"])
        ids = list(range(40, 140))
        logits = (ref_llama if arch == "llama" else ref_gpt2)(cfg, w, ids)
        assert torch.isfinite(logits).all() and 0.2 < logits.std().item() < 10, logits.std()
    assert load_model("tiny-llama")[0].tie_embeddings is False  # exercises the lm_head path
    assert load_model("tiny-gpt2")[0].tie_embeddings is True


def test_paper_shape_and_activation_field():
    """``paper-gpt2`` is the MPCache paper's decode shape (GPT-2 blocks, hidden 1024, 32 heads of 32, SiLU); the
    public part loads without drawing weights. ``act`` is for gpt2 only; unset, it leaves a config's dict (and so
    its digest, which keys weight caches and calibrations) as before the field existed."""
    from mpcache.config import ModelConfig
    from mpcache.model.weights import PAPER_GPT2, load_public, tiny_config

    cfg, _ = load_public("paper-gpt2")
    assert cfg == PAPER_GPT2 and cfg.activation == "silu" and cfg.arch == "gpt2"
    assert (cfg.hidden_size, cfg.n_heads, cfg.head_dim, cfg.vocab_size) == (1024, 32, 32, 50257)
    assert "act" not in tiny_config("gpt2").to_dict() and tiny_config("gpt2").activation == "gelu"
    assert tiny_config("llama").activation == "silu"
    with pytest.raises(ValueError, match="gpt2 models only"):
        dataclasses.replace(tiny_config("llama"), act="silu")
    with pytest.raises(ValueError, match="ModelConfig.act"):
        ModelConfig(**{**tiny_config("gpt2").to_dict(), "act": "relu"})


@pytest.mark.parametrize("spec,layout", [("tiny-gpt2", "gpt2"), ("tiny-llama", "llama")])
def test_safetensors_roundtrip(tmp_path, spec, layout):
    cfg, w, _ = load_model(spec, seed=1)
    save_safetensors_folder(cfg, w, tmp_path, layout=layout)
    cfg2, w2, tok2 = load_model(str(tmp_path))
    assert tok2.is_byte_level
    assert {k: v for k, v in cfg2.to_dict().items() if k != "name"} == {
        k: v for k, v in cfg.to_dict().items() if k != "name"
    }
    assert set(w2) == set(w) and all(torch.equal(w[k], w2[k]) for k in w)
    with pytest.raises(ValueError, match="does not match"):
        save_safetensors_folder(cfg, w, tmp_path / "x", layout="llama" if layout == "gpt2" else "gpt2")


@_hf_mark
@pytest.mark.parametrize("spec,layout", [("tiny-gpt2", "gpt2"), ("tiny-llama", "llama"), ("tiny-gpt2-silu", "gpt2")])
def test_tiny_logits_match_hf(tmp_path, spec, layout):
    import transformers

    cfg, w, _ = load_model(spec.removesuffix("-silu"), seed=2)
    if spec.endswith("-silu"):  # the MPCache paper's edited GPT-2 (activation_function: silu)
        cfg = dataclasses.replace(cfg, act="silu")
    if layout == "llama":  # a non-default theta, so the check sees whether config.json's rope_theta is honoured
        cfg = dataclasses.replace(cfg, rope_theta=500.0)
    save_safetensors_folder(cfg, w, tmp_path, layout=layout)
    cls = transformers.GPT2LMHeadModel if layout == "gpt2" else transformers.LlamaForCausalLM
    m = cls.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    ref = ref_gpt2 if layout == "gpt2" else ref_llama
    cfg2, w2, _ = load_model(str(tmp_path))
    assert cfg2.rope_theta == cfg.rope_theta
    for ids in (list(b"hello world"), list(range(0, 256, 3))):
        with torch.no_grad():
            diff = (ref(cfg, w2, ids) - m(torch.tensor([ids])).logits[0]).abs().max().item()
        assert diff < 1e-4, diff


# ============================================================================ errors
def test_error_unknown_spec_and_missing_paths(tmp_path):
    with pytest.raises(ValueError, match="unknown model spec 'llama-7b'"):
        load_model("llama-7b")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        load_model(str(tmp_path))


def test_error_corrupt_files(tmp_path):
    cfg, w, _ = load_model("tiny-llama")
    d = tmp_path / "m"
    save_safetensors_folder(cfg, w, d)
    (d / "model.safetensors").write_bytes(b"this is not a safetensors file" * 10)
    with pytest.raises(ValueError, match="could not read safetensors file .*model.safetensors"):
        load_model(str(d))
    (d / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="could not parse .*config.json"):
        load_model(str(d))
    g = tmp_path / "bad.gguf"
    g.write_bytes(b"GGUF" + b"\xff" * 64)
    with pytest.raises(ValueError, match="could not read GGUF file .*bad.gguf"):
        load_model(str(g), cache=False)
    real = smollm2_gguf_path().read_bytes()
    t = tmp_path / "truncated.gguf"
    t.write_bytes(real[: len(real) // 2])
    with pytest.raises(ValueError, match="GGUF file .*truncated.gguf"):
        load_model(str(t), cache=False)


def test_error_missing_tensor_and_shape_mismatch(tmp_path):
    from safetensors.torch import load_file, save_file

    cfg, w, _ = load_model("tiny-gpt2")
    save_safetensors_folder(cfg, w, tmp_path, layout="gpt2")
    f = tmp_path / "model.safetensors"
    sd = load_file(str(f))
    del sd["transformer.h.1.mlp.c_fc.bias"], sd["transformer.ln_f.weight"]
    save_file(sd, str(f))
    with pytest.raises(ValueError, match="missing tensor.*h.1.mlp.c_fc.bias.*ln_f.weight"):
        load_model(str(tmp_path))
    save_safetensors_folder(cfg, w, tmp_path, layout="gpt2")
    conf = json.loads((tmp_path / "config.json").read_text())
    conf["n_inner"] = 96
    (tmp_path / "config.json").write_text(json.dumps(conf))
    with pytest.raises(ValueError, match="'layers.0.w_fc' has shape \\(64, 128\\) .* needs \\(64, 96\\)"):
        load_model(str(tmp_path))
    conf["model_type"] = "bert"
    (tmp_path / "config.json").write_text(json.dumps(conf))
    with pytest.raises(ValueError, match="model_type 'bert' is not supported"):
        load_model(str(tmp_path))


def test_hf_folder_without_tokenizer_warns(tmp_path):
    cfg, w, _ = load_model("tiny-llama")
    save_safetensors_folder(cfg, w, tmp_path)
    conf = json.loads((tmp_path / "config.json").read_text())
    del conf["mpcache_tokenizer"]
    (tmp_path / "config.json").write_text(json.dumps(conf))
    with pytest.warns(UserWarning, match="byte-level"):
        _, _, tok = load_model(str(tmp_path))
    assert isinstance(tok, Tokenizer) and tok.is_byte_level


@pytest.mark.parametrize("spec,layout", [("tiny-gpt2", "gpt2"), ("tiny-llama", "llama")])
def test_public_part_needs_no_weights(tmp_path, spec, layout):
    """load_public: the config and tokenizer load_model returns, without reading (or needing) any weight; only
    load_model adds to weight_reads (what the reveal audit reports per rank)."""
    from mpcache.model.weights import load_public, model_source, weight_reads

    cfg, w, tok = load_model(spec, seed=1)
    n = len(weight_reads())
    pcfg, ptok = load_public(spec, seed=1)
    assert (pcfg, ptok.to_json()) == (cfg, tok.to_json()) and len(weight_reads()) == n and model_source(spec) is None
    save_safetensors_folder(cfg, w, tmp_path, layout=layout)
    full = load_model(str(tmp_path))
    assert weight_reads()[n:] == [str(tmp_path / "model.safetensors")]
    (tmp_path / "model.safetensors").unlink()  # a client's copy: config and tokenizer only
    pcfg, ptok = load_public(str(tmp_path))
    assert (pcfg, ptok.to_json()) == (full[0], full[2].to_json()) and len(weight_reads()) == n + 1
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_model(str(tmp_path))
    with pytest.raises(ValueError, match="unknown model spec"):
        load_public("no-such-model")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_fold_norm_gains_is_the_same_model(arch):
    """Folding each block's norm gain (and gpt2's norm bias) into the linear layers that read it gives the same
    logits in float64 (the private run shares the folded weights; a missing gain tells the model it is folded)."""
    from mpcache.backends.plain import PlainBackend
    from mpcache.model.transformer import KVCache, Transformer
    from mpcache.model.weights import fold_norm_gains, folded_norm_names, init_random_weights, tiny_config

    cfg = tiny_config(arch)
    w = {k: v.double() for k, v in init_random_weights(cfg, seed=3).items()}
    folded = fold_norm_gains(cfg, w)
    assert set(w) - set(folded) == folded_norm_names(cfg) and "final_norm.weight" in folded
    ids = list(range(5, 17))
    a = Transformer(cfg, w, PlainBackend()).prefill(ids, KVCache(cfg.n_layers))
    b = Transformer(cfg, folded, PlainBackend()).prefill(ids, KVCache(cfg.n_layers))
    assert torch.allclose(a, b, atol=1e-9, rtol=1e-9), (a - b).abs().max()
