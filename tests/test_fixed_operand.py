"""Fixed-operand Beaver triples (mpcache/mpc/fixed_operand.py) under real mpirun: correctness against the float
model, per-use and offline costs measured by the ledger against the analytic cost, the opened D = W - B
statistically uniform and independent of W, and a private generation with fixed weights equal to plaintext at
lower per-token bytes (the saving equal to the weight matrices' size).

The K/V cache as fixed operands: products with views and concatenations of fixed rows (the cache's q @ K^T,
p @ V, the one-hot gathers, dense and stratified) open only the moving operand; a cache fixed row by row has a
uniform D independent of its contents; private generation with a fixed cache (full cache and MPCache's one-hot
gather; 2PC TFP, 2PC TTP dealer, 3PC replicated) equals plaintext, and every attention product's bytes are
exactly its moving operand (plus each row's one fixing), the saving over the stock path exactly the formula."""

import math

import pytest
from conftest import mpi_job

pytestmark = pytest.mark.mpi

ULP = 2.0**-16
# Inputs lie on the 2^-16 grid, so the ring product before truncation is exact; each party truncates its share
# toward zero, each off by < 1 ulp, so the decoded product is within 2 ulps (2PC; replicated 3PC truncates two
# summed shares on one party: 1 ulp). One-hot x (scale 1) needs no truncation: exact. (Additive 3PC, not run
# here, truncates by CrypTen's wraps protocol: ~3 ulps seen, for the stock matmul too.)
MATMUL_TOL = 2 * ULP
LOGIT_TOL = 0.05  # as in test_private_generation: fixed-point errors over 2 layers, logits O(1-10)


def fixed_matmul_cost(x_shape, w_shape, n_parties: int = 2, replicated: bool = False) -> dict:
    """What a fixed-operand product must cost (the specification the measurements are held to): per use only the
    moving operand's mask opening (additive: 8 (n - 1) bytes per element of x; replicated: x's share, 8 bytes per
    element), against the stock product's both operands; fixing W once opens W's."""
    nx, nw = math.prod(x_shape), math.prod(w_shape)
    k = 8 * (n_parties - 1) if not replicated else 8
    return {
        "fixed_bytes": k * nx,
        "fixed_rounds": 1,
        "stock_bytes": k * (nx + nw),
        "stock_rounds": 1,
        "offline_bytes": k * nw,
        "offline_rounds": 1,
    }


def _z(n):  # 5 standard deviations, two-sided: ~6e-7 false alarms per check
    return 5.0 / math.sqrt(n)


def _check_uses(r, n_parties, replicated=False):
    for u in r["uses"]:
        assert u["err"] <= (0 if u["name"] == "onehot" else MATMUL_TOL), u
        assert u["stock_err"] <= (0 if u["name"] == "onehot" else MATMUL_TOL), u
        want = fixed_matmul_cost(u["x_shape"], u["w_shape"], n_parties, replicated)
        if n_parties == 2 or replicated:  # truncation sends nothing from rank 0 here: bytes are exact
            assert u["fixed"]["bytes_sent"] == want["fixed_bytes"], u
            assert u["stock"]["bytes_sent"] == want["stock_bytes"], u
        # the saving is exactly the stock opening of W - B (or W's share replication), whatever else is sent
        assert u["stock"]["bytes_sent"] - u["fixed"]["bytes_sent"] == want["stock_bytes"] - want["fixed_bytes"], u
        if n_parties == 2:
            assert u["fixed"]["rounds"] == u["stock"]["rounds"] == 1, u


def test_fixed_matmul_2pc_tfp(tmp_path):
    r = mpi_job(2, "fixed_ops", tmp_path)
    assert r["path"] == "fixed-tfp"
    _check_uses(r, 2)
    assert {u["name"] for u in r["uses"]} >= {
        "xT",
        "xT1",
        "onehot",
        "batched",  # transposed and embedding uses
        "qKT",
        "pV",
        "onehot_gather",
        "onehot_strata",
    }  # cache views
    assert r["offline"] == {"bytes_sent": 48 * 80 * 8, "bytes_recv": 48 * 80 * 8, "rounds": 1, "dealer_bytes_recv": 0}
    # D = W - B is uniform on the ring and independent of W: compare its empirical law with U[0, 1) after
    # u = D / 2^64 + 1/2, for a Gaussian W (twice: a fresh B each time) and a constant W.
    st = r["stats"]
    for name in ("gauss", "gauss_again", "const", "cache_gauss", "cache_const"):
        s, n = st[name], st[name]["n"]
        assert abs(s["mean"] - 0.5) <= _z(n) / math.sqrt(12), (name, s)
        sd_of_std = math.sqrt((1 / 80 - 1 / 144) / n) / (2 / math.sqrt(12))  # delta method, uniform moments
        assert abs(s["std"] - 1 / math.sqrt(12)) <= 5 * sd_of_std, (name, s)
        assert s["bit_freq_dev"] <= 0.5 * _z(n), (name, s)  # every one of the 64 bits fair
        assert abs(s["corr_w"]) <= _z(n), (name, s)
        assert s["ks_uniform"] <= math.sqrt(-math.log(1e-6 / 2) / 2) / math.sqrt(n), (name, s)
    n = st["gauss"]["n"]
    assert st["ks_gauss_vs_const"] <= math.sqrt(-math.log(1e-6 / 2) / 2) * math.sqrt(2 / n), st
    n = st["cache_gauss"]["n"]  # a cache fixed row by row: D's law does not depend on the cached values
    assert st["ks_cache_gauss_vs_const"] <= math.sqrt(-math.log(1e-6 / 2) / 2) * math.sqrt(2 / n), st
    assert not st["same_w_same_d"]  # fixing the same W twice draws a fresh B


@pytest.mark.parametrize(
    "protocol,provider,path",
    [("arithmetic", "ttp", "fixed-ttp"), ("replicated", "none", "fixed-replicated")],
    ids=["2pc-ttp", "3pc-replicated"],
)
def test_fixed_matmul_ttp_and_replicated(tmp_path, protocol, provider, path):
    r = mpi_job(3, "fixed_ops", tmp_path, protocol, provider)
    assert r["path"] == path
    if provider == "ttp":  # 2 compute parties + the dealer, which sends party 0 its share of c per use
        _check_uses(r, 2)
        assert all(u["fixed"]["dealer_bytes_recv"] > 0 for u in r["uses"])
        assert r["stats"]["gauss"]["bit_freq_dev"] <= 0.5 * _z(r["stats"]["gauss"]["n"])
    else:
        _check_uses(r, 3, replicated=True)
    assert r["offline"]["bytes_sent"] == 48 * 80 * 8


def _decode_rows(r):
    return [t for t in r["per_token"] if t["token"] > 0]  # token 0's scope has no decode pass


def test_private_generation_fixed_weights(tmp_path):
    fixed = mpi_job(2, "generate_fixed", tmp_path, "tiny-llama", "arithmetic", "tfp", "1", "3")
    stock = mpi_job(2, "generate_fixed", tmp_path, "tiny-llama", "arithmetic", "tfp", "0", "3")
    for r in (fixed, stock):
        assert r["tokens"] == r["plaintext"], r["tokens"]
        assert r["logit_err"] <= LOGIT_TOL
    assert set(fixed["matmul_paths"]) == {"fixed-tfp", "stock"} and set(stock["matmul_paths"]) == {"stock"}
    # each decode step uses every weight matrix once (untied: embed as the embedding, lm_head as the head) and W_q
    # twice (the early offset's product with x / 2^8: Transformer._decode_offset): the stock path re-opens all of
    # them, the fixed path opened them once, offline.
    numel = fixed["weight_numel"]
    mats = sum(
        n
        for k, n in numel.items()
        if k.rsplit(".", 1)[-1] in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down", "lm_head", "embed")
    )
    wq = sum(n for k, n in numel.items() if k.endswith(".wq"))
    assert fixed["offline"]["bytes_sent"] == [8 * mats] * 2 and stock["offline"]["bytes_sent"] == [0, 0]
    for f, s in zip(_decode_rows(fixed), _decode_rows(stock)):
        assert [b - a for a, b in zip(f["bytes_sent"], s["bytes_sent"])] == [8 * (mats + wq)] * 2, (f, s)
        assert f["rounds"] == s["rounds"]


def test_private_generation_fixed_weights_ttp_tied_head(tmp_path):
    """TTP dealer keeping B, gpt2 names (w_fc, w_proj) and the tied head x @ embed.T (the transposed view)."""
    r = mpi_job(3, "generate_fixed", tmp_path, "tiny-gpt2", "arithmetic", "ttp", "1", "2")
    assert r["tokens"] == r["plaintext"], r["tokens"]
    assert r["logit_err"] <= LOGIT_TOL
    assert set(r["matmul_paths"]) == {"fixed-ttp", "stock"}


# ---- the K/V cache as fixed operands ---------------------------------------------------------------------------
ATTN = ("qk", "av", "gather", "fix_kv")


def _scope_bytes(ledger, prefix):
    """Bytes sent / rounds of this party's online traffic at or below ``prefix``."""
    sent = rounds = 0
    for c in ledger["counts"]:
        if c["kind"] == "online" and (c["scope"] == prefix or c["scope"].startswith(prefix + "/")):
            sent, rounds = sent + c["bytes_sent"], rounds + c["rounds"]
    return sent, rounds


def _attn_scopes(r, t, i):
    """The attention scopes of layer i at decode step t that ran, with the element counts the job recorded."""
    base = f"token/{t}/L{i}"
    out = {}
    for name in ATTN:
        recs = [
            u for p, us in r["uses"].items() if p == f"{base}/{name}" or p.startswith(f"{base}/{name}/") for u in us
        ]
        if recs:
            out[name] = recs
    return out


def _check_kv_run(r, policy, two_party=True):
    assert r["tokens"] == r["plaintext"], (r["tokens"], r["plaintext"])
    assert r["logit_err"] <= LOGIT_TOL
    c, steps = r["cfg"], len(r["per_token"])
    H, Hkv, hd = c["H"], c["Hkv"], c["hd"]
    # the prefill fixes each layer's K and V once, for its causal query blocks (one round per layer); the cache keeps
    # them, unless the policy's static eviction compacts them: then the kept rows are fixed once more, at the end
    n = r["n_prompt"]
    for i in range(c["layers"]):
        recs = [u for p, us in r["uses"].items() if p.startswith(f"prefill/L{i}/fix_kv") for u in us]
        assert recs == [["fix", 2 * Hkv * n * hd]], (i, recs)
        assert _scope_bytes(r["ledger"], f"prefill/L{i}/fix_kv") == (8 * 2 * Hkv * n * hd, 1)
    refix = r["uses"].get("prefill/fix_kv", [])
    assert len(refix) <= (0 if policy == "full" else 1), refix  # a policy may keep every row of a short prompt
    assert _scope_bytes(r["ledger"], "prefill/fix_kv")[0] == 8 * sum(m for _, m in refix)
    for t in range(1, steps):
        n_att, L = r["attended"][t - 1], r["n_prompt"] + t
        for i in range(c["layers"]):
            sc = _attn_scopes(r, t, i)
            assert sc["fix_kv"] == [["fix", 2 * Hkv * hd]], sc  # the new K and V rows, once
            if "gather" not in sc:
                # every product has a fixed right operand: what is recorded is its moving operand only
                assert all(kind in ("fixed", "fix") for recs in sc.values() for kind, _ in recs), sc
                assert sc["qk"] == [["fixed", H * hd]] and sc["av"] == [["fixed", H * n_att]], (t, i, sc)
            else:
                # attention in place (Transformer._attend_selected): q·K over every row is fused into the
                # selection's q·[rep | K] product (no "qk" scope), the selected scores are gathered and the
                # probabilities scattered back by the one-hot (two products of fresh shares), and p·V runs over
                # every fixed row (opens p: H·L); K and V never move
                assert policy != "full" and n_att < L
                assert "qk" not in sc and sc["av"] == [["fixed", H * L]], (t, i, sc)
                assert [kind for kind, _ in sc["gather"]] == ["stock", "stock"], sc
            for name, recs in sc.items():  # the ledger agrees to the byte: 8 bytes per opened element
                sent, rounds = _scope_bytes(r["ledger"], f"token/{t}/L{i}/{name}")
                assert sent == 8 * sum(n for _, n in recs), (t, i, name, sent, recs)
                if two_party:
                    assert rounds == len(recs), (t, i, name, rounds, recs)


@pytest.mark.parametrize("policy", ["full", "mpcache"])
def test_fixed_kv_generation_2pc_tfp(tmp_path, policy):
    """tiny-llama (GQA), 2PC TFP: plaintext tokens, exact accounting, and the saving over the stock cache."""
    fixed = mpi_job(2, "generate_kv", tmp_path, "tiny-llama", "arithmetic", "tfp", policy, "1", "3")
    stock = mpi_job(2, "generate_kv", tmp_path, "tiny-llama", "arithmetic", "tfp", policy, "0", "3")
    _check_kv_run(fixed, policy)
    assert stock["tokens"] == stock["plaintext"] == fixed["tokens"]
    c = fixed["cfg"]
    Hkv, hd = c["Hkv"], c["hd"]
    for t in range(1, len(fixed["per_token"])):
        n_att = fixed["attended"][t - 1]
        diff = rdiff = 0
        for i in range(c["layers"]):
            sf, ss = _attn_scopes(fixed, t, i), _attn_scopes(stock, t, i)
            assert all(kind == "stock" for recs in ss.values() for kind, _ in recs), ss
            # stock: q @ K^T and p @ V re-open the attended K and V (Hkv x n_att x hd each); the fixed path opened
            # the new rows instead (2 Hkv hd) ...
            want = 2 * Hkv * hd * n_att - 2 * Hkv * hd
            got = sum(n for recs in ss.values() for _, n in recs) - sum(n for recs in sf.values() for _, n in recs)
            if policy == "mpcache":
                # ... and the stock gathers (K and V apart) open the one-hot twice and both caches' block regions,
                # where the in-place attention opens the candidate scores, the selected probabilities and p over
                # every row instead: fewer elements (the exact count is checked per scope above)
                assert len(ss["gather"]) == 2, ss["gather"]
                assert got > want - 2 * Hkv * hd * n_att + 2 * Hkv * hd, (t, i, got)
                want = got
            assert got == want, (t, i, got, want)
            ad = 0
            for name in ATTN:  # the ledger's attention bytes differ by exactly that
                ad += (
                    _scope_bytes(stock["ledger"], f"token/{t}/L{i}/{name}")[0]
                    - _scope_bytes(fixed["ledger"], f"token/{t}/L{i}/{name}")[0]
                )
                rdiff += (
                    _scope_bytes(fixed["ledger"], f"token/{t}/L{i}/{name}")[1]
                    - _scope_bytes(stock["ledger"], f"token/{t}/L{i}/{name}")[1]
                )
            assert ad == 8 * want, (t, i, ad, want)
            diff += ad
            other = 0  # the selection may use fixed operands of its own: its difference
            for run, sign in ((stock, 1), (fixed, -1)):
                other += sign * _scope_bytes(run["ledger"], f"token/{t}/L{i}/selection")[0]
            diff += other
        # everything else in the token (weights, norms, MLP, softmax, argmax) is unchanged: the token's saving is
        # the attention formula (+ the selection's own), and the only extra round per layer is the new rows' fixing
        tok_diff = stock["per_token"][t]["bytes_sent"][0] - fixed["per_token"][t]["bytes_sent"][0]
        assert tok_diff == diff, (t, tok_diff, diff)
        # the fixed path's one extra round per layer is the new rows' fixing; with the in-place attention the
        # q·K round is gone (fused into the selection's product), so the two paths take the same rounds
        assert rdiff == (c["layers"] if policy == "full" else 0), (t, rdiff)


def test_fixed_kv_generation_ttp_gpt2(tmp_path):
    """tiny-gpt2 (MHA, tied head), 2PC with the TTP dealer keeping B per row: the dealer rebuilds the cache's
    views and concatenations from their small specs."""
    r = mpi_job(3, "generate_kv", tmp_path, "tiny-gpt2", "arithmetic", "ttp", "mpcache", "1", "3")
    _check_kv_run(r, "mpcache")
    assert set(r["matmul_paths"]) == {"fixed-ttp", "stock"}


@pytest.mark.parametrize("policy", ["full", "mpcache"])
def test_fixed_kv_generation_3pc_replicated(tmp_path, policy):
    r = mpi_job(3, "generate_kv", tmp_path, "tiny-llama", "replicated", "none", policy, "1", "3")
    _check_kv_run(r, policy, two_party=False)
    # the prefill's attention runs over K/V fixed per layer: with the full cache every product is fixed
    assert set(r["matmul_paths"]) == ({"fixed-replicated"} if policy == "full" else {"fixed-replicated", "stock"})
