"""Fixed-operand Beaver triples (mpcache/mpc/fixed_operand.py) under real mpirun: correctness against the float
model, per-use and offline costs measured by the ledger against the analytic cost, the opened D = W - B
statistically uniform and independent of W, and a private generation with fixed weights equal to plaintext at
lower per-token bytes (the saving equal to the weight matrices' size)."""
import math

import pytest
from conftest import mpi_job

from mpcache.mpc.fixed_operand import fixed_matmul_cost

pytestmark = pytest.mark.mpi

ULP = 2.0 ** -16
# Inputs lie on the 2^-16 grid, so the ring product before truncation is exact; each party truncates its share
# toward zero, each off by < 1 ulp, so the decoded product is within 2 ulps (2PC; replicated 3PC truncates two
# summed shares on one party: 1 ulp). One-hot x (scale 1) needs no truncation: exact. (Additive 3PC, not run
# here, truncates by CrypTen's wraps protocol: ~3 ulps seen, for the stock matmul too.)
MATMUL_TOL = 2 * ULP
LOGIT_TOL = 0.05              # as in test_private_generation: fixed-point errors over 2 layers, logits O(1-10)


def _z(n):                    # 5 standard deviations, two-sided: ~6e-7 false alarms per check
    return 5.0 / math.sqrt(n)


def _check_uses(r, n_parties, replicated=False):
    for u in r["uses"]:
        assert u["err"] <= (0 if u["name"] == "onehot" else MATMUL_TOL), u
        assert u["stock_err"] <= (0 if u["name"] == "onehot" else MATMUL_TOL), u
        want = fixed_matmul_cost(u["x_shape"], u["w_shape"], n_parties, replicated)
        if n_parties == 2 or replicated:       # truncation sends nothing from rank 0 here: bytes are exact
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
    assert {u["name"] for u in r["uses"]} >= {"xT", "xT1", "onehot", "batched"}      # transposed and embedding uses
    assert r["offline"] == {"bytes_sent": 48 * 80 * 8, "bytes_recv": 48 * 80 * 8, "rounds": 1,
                            "dealer_bytes_recv": 0}
    # D = W - B is uniform on the ring and independent of W: compare its empirical law with U[0, 1) after
    # u = D / 2^64 + 1/2, for a Gaussian W (twice: a fresh B each time) and a constant W.
    st = r["stats"]
    for name in ("gauss", "gauss_again", "const"):
        s, n = st[name], st[name]["n"]
        assert abs(s["mean"] - 0.5) <= _z(n) / math.sqrt(12), (name, s)
        sd_of_std = math.sqrt((1 / 80 - 1 / 144) / n) / (2 / math.sqrt(12))      # delta method, uniform moments
        assert abs(s["std"] - 1 / math.sqrt(12)) <= 5 * sd_of_std, (name, s)
        assert s["bit_freq_dev"] <= 0.5 * _z(n), (name, s)                      # every one of the 64 bits fair
        assert abs(s["corr_w"]) <= _z(n), (name, s)
        assert s["ks_uniform"] <= math.sqrt(-math.log(1e-6 / 2) / 2) / math.sqrt(n), (name, s)
    n = st["gauss"]["n"]
    assert st["ks_gauss_vs_const"] <= math.sqrt(-math.log(1e-6 / 2) / 2) * math.sqrt(2 / n), st
    assert not st["same_w_same_d"]                   # fixing the same W twice draws a fresh B


@pytest.mark.parametrize("protocol,provider,path", [("arithmetic", "ttp", "fixed-ttp"),
                                                    ("replicated", "tfp", "fixed-replicated")],
                         ids=["2pc-ttp", "3pc-replicated"])
def test_fixed_matmul_ttp_and_replicated(tmp_path, protocol, provider, path):
    r = mpi_job(3, "fixed_ops", tmp_path, protocol, provider)
    assert r["path"] == path
    if provider == "ttp":           # 2 compute parties + the dealer, which sends party 0 its share of c per use
        _check_uses(r, 2)
        assert all(u["fixed"]["dealer_bytes_recv"] > 0 for u in r["uses"])
        assert r["stats"]["gauss"]["bit_freq_dev"] <= 0.5 * _z(r["stats"]["gauss"]["n"])
    else:
        _check_uses(r, 3, replicated=True)
    assert r["offline"]["bytes_sent"] == 48 * 80 * 8


def _decode_rows(r):
    return [t for t in r["per_token"] if t["token"] > 0]       # token 0's scope has no decode pass


def test_private_generation_fixed_weights(tmp_path):
    fixed = mpi_job(2, "generate_fixed", tmp_path, "tiny-llama", "arithmetic", "tfp", "1", "3")
    stock = mpi_job(2, "generate_fixed", tmp_path, "tiny-llama", "arithmetic", "tfp", "0", "3")
    for r in (fixed, stock):
        assert r["tokens"] == r["plaintext"], r["tokens"]
        assert r["logit_err"] <= LOGIT_TOL
    assert set(fixed["matmul_paths"]) == {"fixed-tfp", "stock"} and set(stock["matmul_paths"]) == {"stock"}
    # each decode step uses every weight matrix once (untied: embed as the embedding, lm_head as the head):
    # the stock path re-opens all of them, the fixed path opened them once, offline.
    mats = sum(n for k, n in fixed["weight_numel"].items()
               if k.rsplit(".", 1)[-1] in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down", "lm_head", "embed"))
    assert fixed["offline"]["bytes_sent"] == [8 * mats] * 2 and stock["offline"]["bytes_sent"] == [0, 0]
    for f, s in zip(_decode_rows(fixed), _decode_rows(stock)):
        assert [b - a for a, b in zip(f["bytes_sent"], s["bytes_sent"])] == [8 * mats] * 2, (f, s)
        assert f["rounds"] == s["rounds"]


def test_private_generation_fixed_weights_ttp_tied_head(tmp_path):
    """TTP dealer keeping B, gpt2 names (w_fc, w_proj) and the tied head x @ embed.T (the transposed view)."""
    r = mpi_job(3, "generate_fixed", tmp_path, "tiny-gpt2", "arithmetic", "ttp", "1", "2")
    assert r["tokens"] == r["plaintext"], r["tokens"]
    assert r["logit_err"] <= LOGIT_TOL
    assert set(r["matmul_paths"]) == {"fixed-ttp", "stock"}
