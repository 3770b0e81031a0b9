"""Secure ops vs their float models (fixed-point error only) and float models vs the exact op (approximation
error only), under real mpirun with 2 parties (TFP) and 3 parties (replicated)."""
import pytest

from conftest import mpi_job

pytestmark = pytest.mark.mpi

ULP = 2.0 ** -16          # CrypTen's fixed-point resolution (16 fractional bits)


@pytest.fixture(scope="module", params=[("2", "arithmetic", "tfp"), ("3", "replicated", "tfp")],
                ids=["2pc-tfp", "3pc-replicated"])
def ops_results(request, tmp_path_factory):
    n, protocol, provider = request.param
    return mpi_job(int(n), "ops", tmp_path_factory.mktemp("ops"), protocol, provider)


# (op, tolerance secure-vs-float-model, tolerance float-model-vs-exact); each derived in the comment.
CASES = [
    ("tree_max", 0, 0),                    # a mux of ring elements: exact
    ("tree_max_dim0", 0, None),
    ("tree_max_r4_lean", 0, None),         # radix-4 layers + 32-bit-lane comparisons: still a selection, exact
    ("tree_max_r4464_lean_dim0", 0, None),
    ("ltz_lean", 0, None),                 # exact sign for |x| < 2^15 (edges included)
    # exp: 8 squarings raise the base's truncation error (<= 2 ulp: 2PC local / 3PC ABY3 truncation) to the 256th
    # power, a relative error <= 512 ulp; the limit approximation itself is ~2.6% off at x = -12.
    ("exp", 512 * ULP, 0.03),
    ("reciprocal", 2 * 200 * ULP, 1e-6),   # x*(1/x) for x <= 200: a 1-ulp error of 1/x times x, twice over
    # Goldschmidt: 1 + 3 truncated products (<= 2 ulp each: 2PC local / 3PC ABY3), not self-correcting, times
    # x <= 200, twice over for the final product by x
    ("reciprocal_gs", 2 * 4 * 2 * 200 * ULP, 1e-6),
    # outputs |v / sqrt(s)| <= 1: a few truncated products (~10 ulp), plus the coarse sum's ~1 unit of s per
    # element when s >= 2^12 (96 elements: ~5e-4 relative near s = 2^12). Float model vs exact: 3 Goldschmidt
    # steps give 1e-7 for z in [0.84, 1.19], but at s ~ 2^29 the guess Y is 2-3 ulps and z reaches ~0.7 or ~1.4:
    # ~3e-5 relative there (2 ulp of an output <= 1)
    ("norm_scale", 2e-3, 5e-5),
    ("silu", 200 * ULP, 3e-3),             # degree-10 Horner in t=x^2/16: ~1 ulp per step x coefficients ~ 40
    ("gelu", 200 * ULP, 3e-3),
    ("argmax_onehot", 0, None),            # exact one-hot, first maximum on ties
    ("topk_onehot", 0, None),              # exact one-hots (no ties within fixed-point error in these inputs)
    ("keep_onehot", 0, None),
    ("strata_top1_onehot", 0, None),       # exact one-hots (the tournament muxes ring elements)
    ("strata_top1_onehot_even", 0, None),
    # radix-4 levels (strata of 2, 3, 5, 9, 17 slots: every group size and padding case) on integer scores with
    # ties (the first maximum wins), radix 2 and 3 on the same
    *[(f"strata_r4_k{k}", 0, None) for k in (75, 50, 30, 17, 9)],
    ("strata_r2_k9", 0, None),
    ("strata_r3_k9", 0, None),
    *[(f"strata_auto_k{k}", 0, None) for k in (75, 17, 9)],
    # probabilities: each exp is within 512 ulp relative (above); the reciprocal adds ~1 ulp. Limit-exp error ~2%
    # renormalised.
    ("softmax_1024", 512 * ULP, 0.02),
    ("softmax_4096", 512 * ULP, 0.02),
    ("softmax_8192", 512 * ULP, 0.02),
    ("softmax_masked", 512 * ULP, 0.02),
    ("softmax_classic_1024", 512 * ULP, 0.02),     # radix 2, CrypTen comparison, Newton (the old default)
    ("softmax_r2lean_8192", 512 * ULP, 0.02),      # radix 2, lean comparison, Newton (the fewest bytes)
    # anchored (offset = max of 4 + 8 public columns): 10 squarings raise the base's <= 2 ulp truncation error to a
    # relative <= 2048 ulp; float model vs exact: the limit exp's y^2/2048 relative error, 7% at a peak y = 12
    # above the anchors, which renormalisation turns into < 0.02 absolute on these rows
    ("strata_heads_k9_also", 0, None),     # heads folded into the strata + anchor maxima in lockstep: exact
    ("strata_heads_k10", 0, None),
    ("softmax_anchor_1024", 2048 * ULP, 0.02),
    ("softmax_anchor_8192", 2048 * ULP, 0.02),
]


@pytest.mark.parametrize("op,tol,approx_tol", CASES, ids=[c[0] for c in CASES])
def test_secure_op_matches_float_model(ops_results, op, tol, approx_tol):
    r = ops_results[op]
    assert r["err"] <= tol, f"{op}: secure vs float model max abs error {r['err']:.3g} > {tol:.3g}"
    if approx_tol is not None:
        assert r["ref_vs_exact"] <= approx_tol, f"{op}: float model vs exact {r['ref_vs_exact']:.3g} > {approx_tol}"


def test_gathered_attention_matches_its_float_model(ops_results):
    """Three-operand products over a compact one-hot selection of a fixed cache (2PC TFP): the selected scores and
    the output within the truncation's 2 ulp (times the few terms summed after it: exact in the ring before), one
    round each, opening only the one-hot and q, then the attended probabilities (8 bytes per element); the opened
    one-hot mask is a one-time pad (its bits ~half set). Elsewhere (3PC) the two-operand route runs."""
    if not ops_results["gathered_available"]:
        assert "gathered_scores" not in ops_results
        return
    for name in ("gathered_scores", "gathered_values"):
        r = ops_results[name]
        assert r["err"] <= 4 * ULP, (name, r)
        assert r["rounds"] == 1 and r["bytes"] == 8 * r["opened"], (name, r)
    bits = ops_results["gathered_mask_bits"]
    assert abs(bits["mean"] - 0.5) < 0.05, bits


def test_stock_crypten_softmax_is_wrong_where_ours_is_right(ops_results):
    """The reason we ship our own softmax: CrypTen's diverges on long rows (here 1,024 entries)."""
    assert ops_results["stock_softmax_1024"]["err"] > 10 * ops_results["softmax_1024"]["err"]
    assert ops_results["softmax_1024"]["err"] < 512 * ULP


def test_norm_massive_activation(ops_results):
    """32 rows with one |x| = 2.0e4..2.6e4 (SmolLM2's massive activation: sums ~5e8 ~ 2^29) and an ordinary row:
    v / sqrt(s) within 1e-3 of the float model (a protocol that fails with probability ~15% per row fails this)."""
    assert ops_results["norm_massive"]["err"] < 1e-3


def test_anchored_softmax_constant_rounds_and_lean(ops_results):
    """The anchored decode softmax: the same rounds at 1k and 8k columns (no max over the row), fewer rounds and
    bytes than the row-max softmax at both lengths (4 rows here vs 4 in softmax_<n>: same shapes)."""
    a1, a8 = ops_results["softmax_anchor_1024"], ops_results["softmax_anchor_8192"]
    assert a1["rounds"] == a8["rounds"], (a1, a8)
    for n in (1024, 8192):
        a, full = ops_results[f"softmax_anchor_{n}"], ops_results[f"softmax_{n}"]
        assert a["rounds"] < full["rounds"] and a["bytes"] < full["bytes"], (n, a, full)


def test_softmax_rounds_do_not_grow_linearly(ops_results):
    """Rounds grow with log2(m) (the max tree), not with m: 8x more columns = 3 more tree levels."""
    per_level = ops_results["tree_max"]["rounds"] / 9               # 257 columns: 9 levels
    r1, r8 = ops_results["softmax_1024"]["rounds"], ops_results["softmax_8192"]["rounds"]
    assert r8 - r1 <= 3 * per_level + 1, (r1, r8, per_level)


def test_strata_top1_costs_linear_comparisons(ops_results):
    """The stratified tournament on strata of 9 slots (61 columns, k = 7): radix-4 levels 9 -> 3 -> 1, each one
    lean comparison layer + 2 product rounds, O(m) comparisons; the exact rank on 2 rows of 40 (k = 7) makes
    2 (40^2 + 8·40) = 3,840 comparisons. On strata of 17 slots (150 columns, k = 9) radix 4 takes 3 levels
    (17 -> 5 -> 2 -> 1: 2 + 2 + 1 product rounds) where the pairwise tournament takes ceil(log2 17) = 5."""
    cmp = ops_results["ltz_lean"]["rounds"]
    r = ops_results["strata_top1_onehot"]
    assert r["rounds"] == 2 * (cmp + 2), r
    assert r["bytes"] < 0.2 * ops_results["topk_onehot"]["bytes"], r
    assert ops_results["strata_r4_k9"]["rounds"] == 3 * cmp + 5
    assert ops_results["strata_r2_k9"]["rounds"] == 5 * (cmp + 1)
    # the default schedule (ops.strata_schedule "auto") minimises modelled LAN latency: never more rounds than
    # fixed radix 4 on these shapes, and never more bytes at equal rounds
    for kk in (75, 17, 9):
        auto, r4 = ops_results[f"strata_auto_k{kk}"], ops_results[f"strata_r4_k{kk}"]
        assert auto["rounds"] < r4["rounds"] or (auto["rounds"] == r4["rounds"] and auto["bytes"] <= r4["bytes"]), kk


def test_lean_tfp_tuples_and_mpi_exchange(tmp_path):
    """The session's TFP provider (mpcache/mpc/lean_tfp.py) makes valid tuples with uniform-looking shares for
    party 1; openings over MPI and over gloo cost the same (bytes, rounds) and give the same value."""
    r = mpi_job(2, "lean_tfp", tmp_path)
    assert r["provider"] == "LeanTrustedFirstParty"
    for k in ("mul_ok", "matmul_ok", "and_ok", "square_ok", "b2a_ok"):
        assert r[k], (k, r)
    assert abs(r["b2a_mean"] - 0.5) < 5 / (2 * 5000 ** 0.5), r          # 5 sigma of a fair bit's mean
    assert r["p1_share_bit_dev"] < 5 / (2 * (1 << 15) ** 0.5), r
    assert r["mpi_exchange_on"] and r["same_costs"], r
    assert r["max_diff"] <= 4 * ULP, r                                  # two products, each within 2 ulps
