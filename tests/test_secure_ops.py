"""Secure ops, one specification per test: its inputs, the protocol run on shares in every party, the assertions.

Why one file: every protocol's specification runs on the same module-scoped parties per setting.

Each op is checked against its float model (the same algorithm in float64: the error left is the fixed-point
error alone) and its float model against the exact op (the approximation error alone). Tolerances derive from
the fixed-point resolution (16 fractional bits); each is derived beside its assertion. The parties are processes
forked from this one (:class:`mpcache.mpc.local_parties.Parties`: CrypTen, the session's ledger), kept for the
module, in three settings: 2PC with party 0 making the tuples (TFP), 3PC replicated, 2PC with a dealer
process (TTP). Inputs are on the fixed-point grid (no encoding error) and dealt by party 0. What runs in the
parties goes there by pickle: ops, ``functools.partial`` of ops, module-level helpers.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import pytest
import torch

from mpcache.mpc import gather_triple, ops
from mpcache.mpc.fixed_operand import FixedOperand
from mpcache.mpc.local_parties import Parties

ULP = 2.0**-16  # CrypTen's fixed-point resolution (16 fractional bits)

SETTINGS = {
    "2pc-tfp": (2, "arithmetic", "tfp"),
    "3pc-replicated": (3, "replicated", "none"),
    "2pc-ttp": (2, "arithmetic", "ttp"),
}
# With a dealer, every tuple is a request/answer pair with the dealer process (over gloo, pickled): the tests take
# ~13 s in 2PC TTP against ~4 s in 2PC TFP and ~5 s in 3PC.
# The default run (scripts/test: -m "not slow") keeps 2PC TTP for the tests marked EVERY_SETTING below (each
# primitive family once: comparisons, squarings, products, fixed operands); -m slow runs it on every test.
SLOW_TTP = ["2pc-tfp", "3pc-replicated", pytest.param("2pc-ttp", marks=pytest.mark.slow)]
EVERY_SETTING = pytest.mark.parametrize("setting", list(SETTINGS), indirect=True)


@pytest.fixture(scope="module", params=SLOW_TTP)
def setting(request):
    """The parties of one setting, kept for the module (one setting alive at a time)."""
    n, protocol, provider = SETTINGS[request.param]
    with Parties(n, protocol=protocol, provider=provider, timeout=300) as parties:
        yield parties


def grid(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to the fixed-point grid, in float64."""
    return torch.round(x.double() * 2**16) / 2**16


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@dataclass
class Opened:
    """A secure op's output, opened, and its online cost to party 0 (the op's calls only: not the inputs' sharing;
    not the dealer's traffic with TTP)."""

    value: torch.Tensor
    rounds: int
    bytes: int


def _on_shares(sess, cases: dict) -> dict[str, Opened]:
    """In each party: every ``name: (op, inputs)`` as ``op(*shares of inputs)``, in order; opened, costed."""
    import crypten

    out = {}
    for name, (op, xs) in cases.items():
        shares = [crypten.cryptensor(x.float(), src=0) for x in xs]
        with sess.scope(name):
            y = op(*shares)
        cost = sess.ledger.totals(name, kind="online")
        out[name] = Opened(y.get_plain_text().double(), cost["rounds"], cost["bytes_sent"])
    return out


def secure(parties: Parties, cases: dict) -> dict[str, Opened]:
    """Each ``name: (op, inputs)`` run as ``op(*shares of inputs)`` by every party, one after the other;
    ``{name: Opened}`` as party 0 sees it."""
    return parties.run(_on_shares, cases)[0].value


def secure1(parties: Parties, op, *xs) -> Opened:
    return secure(parties, {"op": (op, xs)})["op"]


def times_x(a, op):
    """``op(a) * a``: a reciprocal checked against 1."""
    return op(a) * a


def err(got: torch.Tensor, want: torch.Tensor) -> float:
    return (got.double() - want.double()).abs().max().item()


# ---- comparisons and tournaments: selections of ring elements, exact -------------------------------------------
def test_tree_max_is_an_exact_selection(setting):
    """A max tree muxes ring elements: exact along either dim, in radix 2, radix 4 and a mixed (4, 4, 64)
    schedule, with CrypTen's comparison or the lean (32-bit-lane) one; lean layers of radix <= 8 run on a mask plan
    in 2PC (tournament._masked_max_layer: the mux local), ties included (rows of equal values, runs of repeats)."""
    x = grid(torch.randn(3, 257, generator=gen(0)) * 4)
    ties = grid(torch.randint(-3, 4, (5, 41), generator=gen(1)).double() / 4)
    ties[0] = 0.75  # one row of a single value
    out = secure(
        setting,
        {
            "r2": (partial(ops.tree_max, dim=-1), [x]),
            "r2 dim 0": (partial(ops.tree_max, dim=0), [x]),
            "r4 lean": (partial(ops.tree_max, dim=-1, radix=4, lean=True), [x]),
            "r(4,4,64) lean dim 0": (partial(ops.tree_max, dim=0, radix=(4, 4, 64), lean=True), [x.t().contiguous()]),
            "r(8,3,2) lean ties": (partial(ops.tree_max, dim=-1, radix=(8, 3, 2), lean=True), [ties]),
            "r2 lean ties": (partial(ops.tree_max, dim=-1, radix=2, lean=True), [ties]),
        },
    )
    assert torch.equal(ops.tree_max_reference(x, -1), x.max(-1).values)
    for name, want in (
        ("r2", x.max(-1).values),
        ("r2 dim 0", x.max(0).values),
        ("r4 lean", x.max(-1).values),
        ("r(4,4,64) lean dim 0", x.max(-1).values),
        ("r(8,3,2) lean ties", ties.max(-1).values),
        ("r2 lean ties", ties.max(-1).values),
    ):
        assert err(out[name].value, want) == 0, name


@EVERY_SETTING
def test_lean_comparison_is_the_exact_sign(setting):
    """The lean comparison (32-bit lanes) gives the exact sign for |x| < 2^15: its whole range and its edges."""
    x = grid(torch.randn(4, 333, generator=gen(1)) * 3000)
    x[0, :12] = torch.tensor(
        [0.0, -(2.0**-16), 2.0**-16, 1.0, -1.0, 32767.0, -32767.0, 32767.5, -32768.0, 16000.0, -16000.0, 0.0]
    )
    assert torch.equal(secure1(setting, ops._ltz_lean, x).value, (x < 0).double())


def test_clamp_is_exact(setting):
    """min(max(x, lo), hi) with public bounds: exactly lo, hi or x (a mux of ring elements), below, inside, above and
    at the bounds, in one comparison layer + one product round."""
    x = grid(torch.randn(4, 50, generator=gen(16)) * 6)
    x[0, :6] = torch.tensor([-2.5, 3.0, -2.5 - 2.0**-16, 3.0 + 2.0**-16, 0.0, -1000.0])
    out = secure(
        setting,
        {
            "clamp": (partial(ops.clamp, lo=-2.5, hi=3.0), [x]),
            "cmp": (ops._ltz_lean, [torch.randn(5, generator=gen(10))]),
        },
    )
    assert torch.equal(out["clamp"].value, ops.clamp_reference(x, -2.5, 3.0))
    assert torch.equal(ops.clamp_reference(x, -2.5, 3.0), x.clamp(-2.5, 3.0))
    assert out["clamp"].rounds == out["cmp"].rounds + 1


def test_argmax_index_is_exact_and_takes_the_first_maximum(setting):
    """The index tournament (adjacent pairs, then the schedule's wider layers): exact, first maximum on ties, on a
    vocabulary-like row (49,152: SmolLM2's) and on rows with ties across blocks of every layer."""
    x = grid(torch.randn(4, 1000, generator=gen(2)))
    x[1, 10] = x[1, 500] = x[1].max() + 1.0  # a tie: the first maximum wins
    x[2, 3] = x[2, 2] = x[2, 999] = x[2].max() + 0.5  # an adjacent tie (a radix-2 pair) and a far one
    x[3] = torch.round(x[3])  # ties everywhere
    vocab = grid(torch.randn(1, 49152, generator=gen(12)) * 4)
    out = secure(
        setting,
        {
            "rows": (ops.argmax_index, [x]),
            "radix 4": (partial(_argmax_radix, radix=4), [x]),
            "vocab": (ops.argmax_index, [vocab]),
        },
    )
    for name, v in (("rows", x), ("radix 4", x), ("vocab", vocab)):
        assert torch.equal(out[name].value, ops.argmax_index_reference(v)), name
    assert out["rows"].value[1, 0] == 10 and out["rows"].value[2, 0] == 2
    if setting.n == 2:  # stated: ~143 B per logit, 65 rounds (LAN schedule); the one-hot argmax took ~340 B
        assert out["vocab"].bytes / vocab.numel() <= 145 and out["vocab"].rounds <= 65, out["vocab"]


def _argmax_radix(x, radix):
    import dataclasses

    from mpcache.mpc.config import MpcConfig

    return ops.argmax_index(x, cfg=dataclasses.replace(MpcConfig.current(), argmax_radix=radix))


def test_topk_and_keep_onehots_are_exact(setting):
    """Top-k rows (r-th largest) and keep rows (the k largest in position order) by exact pairwise rank: a row of
    distinct scores 0.37 apart and a Gaussian row (no ties within the fixed-point error)."""
    from mpcache.backends.plain import PlainBackend

    plain = PlainBackend()
    s = grid(
        torch.stack(
            [
                torch.randperm(40, generator=gen(3)).double() * 0.37 - 5,
                torch.randn(40, generator=gen(4), dtype=torch.float64),
            ]
        )
    )
    out = secure(setting, {"topk": (partial(ops.topk_onehot, k=7), [s]), "keep": (partial(ops.keep_onehot, k=9), [s])})
    assert torch.equal(out["topk"].value, plain.topk_onehot(s, 7))
    assert torch.equal(out["keep"].value, plain.keep_onehot(s, 9))


def test_strata_top1_onehot_is_exact_with_linear_comparisons(setting):
    """One-hot of each public stratum's first maximum (the tournament muxes ring elements: exact): strata of 8-9
    slots, radix 4, with a tie inside a stratum; and k dividing m (radix from the schedule). On strata of 9 slots
    (61 columns, k = 7) radix 4 takes levels 9 -> 3 -> 1, each one lean comparison layer + 2 product rounds, O(m)
    comparisons: bytes < 20% of the exact rank's on 2 rows of 40 (k = 7: 2 (40^2 + 8·40) comparisons)."""
    from mpcache.backends.plain import PlainBackend

    st = grid(torch.randn(2, 3, 61, generator=gen(5)))
    st[0, 1, 14] = st[0, 1, 15] = st[0, 1, 12:18].max() + 1.0  # a tie inside a stratum: the first wins
    even = grid(torch.randn(4, 64, generator=gen(6)))
    out = secure(
        setting,
        {
            "k7 r4": (partial(ops.strata_top1_onehot, k=7, radix=4), [st]),
            "k8 of 64": (partial(ops.strata_top1_onehot, k=8), [even]),
            "cmp": (ops._ltz_lean, [torch.randn(5, generator=gen(10))]),
            "rank top-7": (partial(ops.topk_onehot, k=7), [torch.randn(2, 40, generator=gen(10))]),
        },
    )
    assert torch.equal(out["k7 r4"].value, ops.strata_top1_onehot_reference(st, 7).double())
    assert torch.equal(out["k8 of 64"].value, PlainBackend().strata_top1_onehot(even, 8))
    # 2PC (TFP, dealer): each level on a mask plan (tournament._masked_levels): the comparison's rounds alone
    assert out["k7 r4"].rounds == 2 * (out["cmp"].rounds + (0 if setting.n == 2 else 2))
    assert out["k7 r4"].bytes < 0.2 * out["rank top-7"].bytes


def test_strata_top1_onehot_at_every_level_size(setting):
    """Strata of 2, 3, 5, 9 and 17 slots (k = 75, 50, 30, 17, 9 of 150 columns): every radix-4 group size and
    padding case; radix 2 and 3; the default latency-minimising schedule. Integer scores: ties everywhere (the
    first maximum wins): exact. On strata of 17 slots (k = 9) radix 4 takes 3 levels (17 -> 5 -> 2 -> 1: 2 + 2 + 1
    product rounds) where the pairwise tournament takes ceil(log2 17) = 5. The default schedule minimises modelled
    LAN latency: never more rounds than radix 4, nor more bytes at equal rounds."""
    ti = torch.randint(-3, 4, (3, 2, 150), generator=gen(7)).double()
    cases = {f"r4 k{k}": (k, 4) for k in (75, 50, 30, 17, 9)}
    cases |= {"r2 k9": (9, 2), "r3 k9": (9, 3)} | {f"auto k{k}": (k, None) for k in (75, 17, 9)}
    out = secure(
        setting,
        {
            "cmp": (ops._ltz_lean, [torch.randn(5, generator=gen(10))]),
            **{name: (partial(ops.strata_top1_onehot, k=k, radix=r), [ti]) for name, (k, r) in cases.items()},
        },
    )
    for name, (k, _) in cases.items():
        assert torch.equal(out[name].value, ops.strata_top1_onehot_reference(ti, k).double()), name
    cmp = out["cmp"].rounds
    if setting.n == 2:  # mask plans (tournament._masked_levels): the comparisons' rounds alone (5 or 6 by size)
        assert 3 * cmp <= out["r4 k9"].rounds <= 3 * (cmp + 1)
        assert 5 * cmp <= out["r2 k9"].rounds <= 5 * (cmp + 1)
    else:
        assert out["r4 k9"].rounds == 3 * cmp + 5
        assert out["r2 k9"].rounds == 5 * (cmp + 1)
    for k in (75, 17, 9):
        auto, r4 = out[f"auto k{k}"], out[f"r4 k{k}"]
        assert auto.rounds < r4.rounds or (auto.rounds == r4.rounds and auto.bytes <= r4.bytes), (k, auto, r4)


def heads_onehot_and_maxima(a, *also, k):
    """``strata_select`` over the heads of ``a`` (and the maxima of ``also``): the one-hot, checked to be at ring
    scale 1, brought to ``a``'s scale and flattened beside the maxima."""
    import crypten

    oh, maxes = ops.strata_select(a, k, heads=True, also=list(also))
    assert oh.encoder.scale == 1
    fx = ops._from_shares(oh.share * int(a.encoder.scale), precision=None)
    fx.encoder = a.encoder
    return crypten.cat([fx.reshape(-1)] + [t.reshape(-1) for t in maxes])


def test_strata_select_folds_heads_and_anchor_maxima_exactly(setting):
    """MPCache's selection: the stratified top-1 over the max of a group's heads, with the maxima of other rows
    (the anchors) computed in the same comparison layers. Integer scores with ties across heads and slots;
    strata of 4 and 5 slots. The one-hot comes back at ring scale 1 (0/1: products need no truncation)."""
    a = torch.randint(-6, 7, (3, 3, 41), generator=gen(8)).double()
    b = grid(torch.randn(3, 3, 12, generator=gen(9)) * 5)
    out = secure(
        setting,
        {
            "k9 + anchors": (partial(heads_onehot_and_maxima, k=9), [a, b]),
            "k10": (partial(heads_onehot_and_maxima, k=10), [a]),
        },
    )
    oh9, oh10 = (ops.strata_top1_onehot_reference(a, k, heads=True).reshape(-1).double() for k in (9, 10))
    assert torch.equal(out["k9 + anchors"].value, torch.cat([oh9, b.amax(-1).reshape(-1)]))
    assert torch.equal(out["k10"].value, oh10)


# ---- approximations ---------------------------------------------------------------------------------------------
@EVERY_SETTING
def test_exp_limit(setting):
    """(1 + x/256)^256 by 8 squarings: they raise the base's truncation error (<= 2 ulp: 2PC local / 3PC ABY3
    truncation) to the 256th power, a relative error <= 512 ulp of outputs <= 1; the limit itself is ~2.6% off
    at x = -12."""
    x = grid(-(torch.randn(3, 257, generator=gen(11)) * 4).abs())
    y = secure1(setting, ops.exp_limit, x).value
    assert err(y, ops.exp_limit_reference(x)) <= 512 * ULP
    assert err(ops.exp_limit_reference(x), x.exp()) <= 0.03


@EVERY_SETTING
def test_exp_limit_order_2(setting):
    """The anchored softmax's exp: (1 + t + t^2/2)^128, t = y/128 (7 squarings after one square), on y in
    [-40, 10] (the guard clamps above 10). Fixed point: the base's truncation errors (<= 3 ulp: t^2, its half, t)
    raised to the 128th power, ~384 ulp relative, on outputs up to e^10 = 22026: within 512 ulp x max(1, e^y) of
    the float model. Float model vs exact, |y| <= 12: relative error <= 1.1 |y|^3 / (6 4^7) (first order |y|^3 / 98304: 1.0% at |y| = 10,
    0.07% at 4; the order-1 base at 10 squarings: y^2 / 2048, 4.9% and 0.8%)."""
    g = gen(12)
    y = grid(torch.cat([torch.linspace(-40, 10, 501), torch.rand(256, generator=g) * 14 - 4]))
    out = secure1(setting, partial(ops.exp_limit, iters=7, order=2), y).value.double()
    ref = ops.exp_limit_reference(y, iters=7, order=2)
    assert ((out - ref).abs() <= 512 * ULP * ref.clamp(min=1)).all(), ((out - ref).abs() / ref.clamp(min=1)).max()
    near = y.abs() <= 12  # below -12 an entry weighs < e^-12 of the anchors': the bound is for the range that counts
    exact = y.double().exp()
    assert ((ref - exact).abs() <= (y.double().abs() ** 3 / 98304 * 1.1 + 1e-12) * exact)[near].all()
    assert ((ops.exp_limit_reference(y, iters=10) - exact).abs() / exact)[y.abs() == 10].max() > 0.045  # order 1


@EVERY_SETTING
@pytest.mark.parametrize("method", ["newton", "goldschmidt"])
def test_reciprocal_times_x_is_one(setting, method):
    """x * (1/x) for x in [0.005, 200]. Newton: a 1-ulp error of 1/x times x <= 200, twice over. Goldschmidt
    (lean step guess): 1 + 3 truncated products (<= 2 ulp each: 2PC local / 3PC ABY3), not self-correcting, times
    x <= 200, twice over for the final product by x. Float models vs exact: 1e-6."""
    x = grid(torch.logspace(-2.3, 2.3, 64))
    if method == "newton":
        op, ref, tol = ops.reciprocal_nr, ops.reciprocal_nr_reference, 2 * 200 * ULP
    else:
        op, ref, tol = partial(ops.reciprocal_gs, lean=True), ops.reciprocal_gs_reference, 2 * 4 * 2 * 200 * ULP
    y = secure1(setting, partial(times_x, op=op), x).value
    assert err(y, ref(x) * x) <= tol
    assert err(ref(x) * x, torch.ones_like(x)) <= 1e-6


def test_norm_scale_over_the_guess_range(setting):
    """v / sqrt(sum v^2 + 0.05) on rows whose sums of squares span the guess's range (2^-8 .. 2^30.9), massive
    activations included. Outputs |.| <= 1: a few truncated products (~10 ulp), plus the coarse sum's ~1 unit of
    s per element when s >= 2^12 (96 elements: ~5e-4 relative near s = 2^12) and v / 2^8's truncation on the
    coarse branch (~2^-14 at s = 2^12): 2e-3. Float model vs exact: the degree-2 polynomial's relative error over
    the table's z range (8.5e-5 at 5 steps per octave, the guesses on a 16-ulp grid), the whole range up to 2^31 --
    the coarse branch's guess keeps >= 362 ulps there (the 3 Goldschmidt steps this replaced drifted by 0.04% .. 2%
    above s ~ 2^30). Rounds (2PC): square, one lean comparison layer (5 for up to ~11 rows: blocks of 4; 6 beyond:
    _norm_rounds_2pc), the branch select (local on bit slots), z = s' Q beside v' Y, z^2, the output: 9 (a decode row)
    or 10."""
    g = gen(0)
    torch.randn(3, 257, generator=g)  # the rows the tolerance was set on: the second draw of seed 0
    v = torch.randn(40, 96, generator=g) * torch.logspace(-4.5, 3.5, 40).reshape(-1, 1)
    v[-12:-4, 5] = torch.tensor([2.0e4, 2.2e4, 2.5e4, 3.0e4, 3.5e4, 4.0e4, 4.2e4, 4.4e4])  # s up to 2^30.87
    v = grid(v)
    out = secure1(setting, partial(ops.norm_scale, add=0.05), v)
    assert err(out.value, ops.norm_scale_reference(v, 0.05)) <= 2e-3
    assert err(ops.norm_scale_reference(v, 0.05), v / ((v**2).sum(-1, keepdim=True) + 0.05).sqrt()) <= 8.6e-5
    if setting.n == 2:
        assert out.rounds == _norm_rounds_2pc(40) == 10, out.rounds


def _norm_rounds_2pc(rows: int) -> int:
    """norm_scale's rounds in 2PC over ``rows`` rows: its comparison layer (the table's thresholds per row) in
    blocks of compare.block_size, + 4 (square, z beside v' Y, z^2, output; the branch select is local on the mask
    plan's bit slots, session 13)."""
    from mpcache.mpc.compare import and_planes_2pc, block_size
    from mpcache.mpc.config import MpcConfig
    from mpcache.mpc.norms import _norm_table

    cfg = MpcConfig()
    T = len(_norm_table(*cfg.norm_range, cfg.norm_steps)[0])
    return 4 + len(and_planes_2pc(32, block_size(32, T * rows))) + 1


def _norm_and_scale(v, add):
    import crypten

    out, r = ops.norm_scale(v, add, scale=True)
    return crypten.cat([out, r], dim=-1)


def test_norm_scale_also_returns_its_scale(setting):
    """``scale=True``: the same output and, beside it, R = 2^8 s^-1/2 (what Transformer._decode_offset scales an
    offset made from the unnormalised row by), in the same 9 rounds (2PC). Rows spanning s = 2^-8 .. 2^30.9. R is
    Y' p with Y' exact in the ring: within the output's own relative error of the float model (2e-3, from z's
    truncated products moving p; + 4 ULP for the last product), and the float model within the polynomial's 8.5e-5 of 2^8 / sqrt(s)."""
    g = gen(0)
    v = torch.randn(40, 96, generator=g) * torch.logspace(-4.5, 3.5, 40).reshape(-1, 1)
    v[-12:-4, 5] = torch.tensor([2.0e4, 2.2e4, 2.5e4, 3.0e4, 3.5e4, 4.0e4, 4.2e4, 4.4e4])
    v = grid(v)
    out = secure1(setting, partial(_norm_and_scale, add=0.05), v)
    want, r_ref = ops.norm_scale_reference(v, 0.05, scale=True)
    assert err(out.value[..., :-1], want) <= 2e-3
    r = out.value[..., -1:].double()
    assert ((r - r_ref).abs() <= 4 * ULP + 2e-3 * r_ref).all(), (r - r_ref).abs().max()
    exact = 2.0**8 / ((v.double() ** 2).sum(-1, keepdim=True) + 0.05).sqrt()
    assert ((r_ref - exact).abs() <= 8.6e-5 * exact).all()
    if setting.n == 2:
        assert out.rounds == _norm_rounds_2pc(v.shape[0]), out.rounds


def _norm_then(v, w):
    return ops.norm_scale(v, 0.05, then=lambda h: h.matmul(w))


def test_norm_scale_with_the_next_layer_inside(setting):
    """``then``: the next layer's product (here a product with a shared (96, 8) matrix) on v' Y, beside the
    polynomial, then times p: within the norm's own tolerance times the layer's row norms (|w| < 0.5, 96 rows:
    2e-3 x 8) of the float model (norm, then the product), in the norm's rounds (2PC: 9 or 10, _norm_rounds_2pc) instead of one more."""
    g = gen(2)
    v = grid(torch.randn(12, 96, generator=g) * torch.logspace(-2, 2, 12).reshape(-1, 1))
    w = grid(torch.rand(96, 8, generator=g) - 0.5)
    out = secure(setting, {"then": (_norm_then, (v, w)), "norm": (partial(ops.norm_scale, add=0.05), (v,))})
    want = ops.norm_scale_reference(v, 0.05, then=lambda h: h @ w.double())
    assert err(out["then"].value, want) <= 2e-3 * 8, err(out["then"].value, want)
    if setting.n == 2:
        assert out["then"].rounds == out["norm"].rounds == _norm_rounds_2pc(12), (
            out["then"].rounds,
            out["norm"].rounds,
        )


def test_norm_scale_massive_activation(setting):
    """32 rows with one |x| = 2.0e4..2.6e4 (SmolLM2's massive activation: sums ~5e8 ~ 2^29) and an ordinary row:
    v / sqrt(s) within 1e-3 of the float model (a protocol that fails with probability ~15% per row fails this)."""
    h = torch.randn(33, 576, generator=gen(13))
    h[1:, 7] = torch.linspace(2.0e4, 2.6e4, 32)
    h = grid(h)
    y = secure1(setting, partial(ops.norm_scale, add=5.76e-3), h).value
    assert err(y, ops.norm_scale_reference(h, 5.76e-3)) < 1e-3


# SiLU / GeLU: tests/test_floor.py (with the coarse comparison they are built on).


# ---- softmax ----------------------------------------------------------------------------------------------------
def attention_rows(n: int, seed: int) -> torch.Tensor:
    """2 near-uniform rows (stock CrypTen's reciprocal diverges on them) and 2 peaked ones (a +20 spike)."""
    g = gen(seed)
    flat = torch.randn(2, n, generator=g) * 0.01
    peaked = torch.randn(2, n, generator=g) * 3
    peaked[:, 5] += 20
    return grid(torch.cat([flat, peaked]))


# probabilities: each exp within 512 ulp relative (see test_exp_limit), the reciprocal adds ~1 ulp; the limit
# exp's error, renormalised: 0.02
SOFTMAX_TOL, SOFTMAX_APPROX_TOL = 512 * ULP, 0.02


def stock_softmax(a):
    return ops.stock_softmax(a)


def test_stock_softmax_baseline(setting):
    """CrypTen's own softmax (``MpcConfig.softmax_baseline = "stock"``: the paper's kind of full-cache baseline,
    used for costs only) routed through ``ops.softmax`` whatever ``anchor``, masked or not, is within its float
    model (the exact softmax) on short rows of range <= 2: its limit exp (2^8 steps) errs by <= x^2/512 <= 0.8%
    relative there, its reciprocal converges (sum << 250), so the tolerance is 0.01 absolute. Its rounds grow
    with the row (a pairwise max tree) where ours stay constant."""
    g = gen(41)
    x16, x64 = grid(torch.rand(3, 16, generator=g) * 2 - 1), grid(torch.rand(3, 64, generator=g) * 2 - 1)
    mask = (torch.rand(3, 16, generator=g) > 0.3).double()
    mask[:, 0] = 1
    cfg = ops.MpcConfig(softmax_baseline="stock")  # only the stock route reads it
    out = secure(
        setting,
        {
            "16": (partial(ops.softmax, anchor=(1, 2), cfg=cfg), [x16]),
            "64": (partial(ops.softmax, anchor=(1, 2), cfg=cfg), [x64]),
            "masked": (partial(ops.softmax, mask=mask, cfg=cfg), [x16]),
            "ours 64": (partial(ops.softmax, anchor=(1, 2)), [x64]),
        },
    )
    for name, x, m in (("16", x16, None), ("64", x64, None), ("masked", x16, mask)):
        ref = ops.softmax_reference(x, mask=m, cfg=cfg)
        exact = torch.softmax(x if m is None else x.masked_fill(m == 0, float("-inf")), -1)
        assert torch.equal(ref, exact * (1 if m is None else m))
        assert err(out[name].value, ref) <= 0.01, name
    assert out["64"].rounds > out["16"].rounds  # two more levels of the max tree
    assert out["64"].rounds > out["ours 64"].rounds


def test_softmax_on_long_rows(setting):
    """The default softmax (lean max tree, "auto" radices, Goldschmidt reciprocal) at 1,024, 4,096 and 8,192
    columns, within SOFTMAX_TOL of its float model. Its rounds grow with log2(m) (the max tree), not with m: 8x
    more columns = at most 3 more tree levels (a level: one comparison and one mux, measured on a radix-2 tree of
    257 columns: 9 levels). The reason we ship our own: CrypTen's softmax diverges on the near-uniform rows (its
    reciprocal's Newton iterations leave their range once the sum of exponentials exceeds ~250)."""
    rows = {n: attention_rows(n, seed=n) for n in (1024, 4096, 8192)}
    out = secure(
        setting,
        {
            **{str(n): (ops.softmax, [x]) for n, x in rows.items()},
            "stock 1024": (stock_softmax, [rows[1024]]),
            "tree 257": (partial(ops.tree_max, dim=-1), [torch.randn(1, 257, generator=gen(15))]),
        },
    )
    for n, x in rows.items():
        assert err(out[str(n)].value, ops.softmax_reference(x)) <= SOFTMAX_TOL, n
        assert err(ops.softmax_reference(x), torch.softmax(x, -1)) <= SOFTMAX_APPROX_TOL, n
    per_level = out["tree 257"].rounds / 9
    assert out["8192"].rounds - out["1024"].rounds <= 3 * per_level + 1, (out["1024"].rounds, out["8192"].rounds)
    exact = torch.softmax(rows[1024], -1)
    assert err(out["stock 1024"].value, exact) > 10 * err(out["1024"].value, exact)


@pytest.mark.parametrize(
    "n,kw",
    [
        (1024, {"radix": 2, "lean": False, "recip": "newton"}),  # the old default
        (8192, {"radix": 2, "lean": True, "recip": "newton"}),
    ],  # the fewest bytes
    ids=["classic-1024", "r2lean-8192"],
)
def test_softmax_variants(setting, n, kw):
    """The softmax before the lean defaults (radix-2 max tree, CrypTen's comparison, Newton reciprocal) and the
    one of fewest bytes (radix 2, lean comparison, Newton), each within the same bounds as the default's."""
    x = attention_rows(n, seed=n + 1)
    y = secure1(setting, partial(ops.softmax, **kw), x).value
    assert err(y, ops.softmax_reference(x, **kw)) <= SOFTMAX_TOL
    assert err(ops.softmax_reference(x, **kw), torch.softmax(x, -1)) <= SOFTMAX_APPROX_TOL


def test_softmax_masked(setting):
    """A public 0/1 mask (column 0 always kept): masked entries get probability 0."""
    g = gen(14)
    mask = (torch.rand(3, 300, generator=g) > 0.3).double()
    mask[:, 0] = 1
    x = grid(torch.randn(3, 300, generator=g) * 3)
    y = secure1(setting, partial(ops.softmax, mask=mask), x).value
    assert err(y, ops.softmax_reference(x, mask=mask)) <= SOFTMAX_TOL
    assert (
        err(ops.softmax_reference(x, mask=mask), torch.softmax(x.masked_fill(mask == 0, float("-inf")), -1))
        <= SOFTMAX_APPROX_TOL
    )


def anchored_rows(n: int, seed: int) -> torch.Tensor:
    """Attention-like rows (high sinks in the first 4 columns), a retrieval peak 10 above the anchors, a near-flat
    row, a row whose max is an anchor (the last column)."""
    g = gen(seed)
    x = torch.randn(4, n, generator=g) * 2
    x[:3, :4] += 6.0
    x[1, n // 3] = x[1, list(range(4)) + list(range(n - 8, n))].max() + 10.0
    x[2] = torch.randn(n, generator=g) * 0.01
    x[3, n - 1] += 12.0
    return grid(x)


def test_anchored_softmax(setting):
    """The decode softmax with offset = max of the first 4 and last 8 columns (no max over the row), at 1,024 and
    8,192 columns: 10 squarings raise the base's <= 2 ulp truncation error to a relative <= 2048 ulp; float model
    vs exact: the limit exp's y^2/2048 relative error, 7% at a peak 12 above the anchors, which renormalisation
    turns into < 0.02. The same rounds at both lengths, and fewer rounds and bytes than the row-max softmax on the
    same rows."""
    rows = {n: anchored_rows(n, seed=n + 2) for n in (1024, 8192)}
    out = secure(
        setting,
        {
            f"{kind} {n}": (f, [x])
            for n, x in rows.items()
            for kind, f in (("anchored", partial(ops.softmax, anchor=(4, 8))), ("row max", ops.softmax))
        },
    )
    for n, x in rows.items():
        assert err(out[f"anchored {n}"].value, ops.softmax_reference(x, anchor=(4, 8))) <= 2048 * ULP, n
        assert err(ops.softmax_reference(x, anchor=(4, 8)), torch.softmax(x, -1)) <= SOFTMAX_APPROX_TOL, n
        a, full = out[f"anchored {n}"], out[f"row max {n}"]
        assert a.rounds < full.rounds and a.bytes < full.bytes, (n, a, full)
    assert out["anchored 1024"].rounds == out["anchored 8192"].rounds


# ---- attention over a compact selection: the three-operand route --------------------------------------------------
def _gathered_setup(seed=5, interleave=False):
    """A fixed K/V of 2 kv heads (3 queries each, d = 8): 4 always-attended rows, 23 candidate blocks of 4 rows in
    strata for k = 5, 6 recent rows; a one-hot choosing one block per stratum."""
    g = gen(seed)
    hkv, G, d, blk, C, k, tail = 2, 3, 8, 4, 23, 5, 6
    L = blk + C * blk + tail

    def rnd(*shape, scale=1.0):
        return grid(torch.randn(*shape, generator=g) * scale)

    K, V, q = rnd(hkv, L, d), rnd(hkv, L, d), rnd(hkv, G, d, scale=0.5)
    idx, valid = ops.strata_layout(C, k, interleave)
    choice = (torch.rand(hkv, k, generator=g) * valid.sum(1)).long()
    oh = torch.nn.functional.one_hot(choice, int(idx.shape[1])).double()
    p, p_rest = rnd(hkv, G, k * blk, scale=0.1).abs(), rnd(hkv, G, blk + tail, scale=0.1).abs()
    return {
        "K": K,
        "V": V,
        "q": q,
        "idx": idx,
        "oh": oh,
        "p": p,
        "p_rest": p_rest,
        "blk": blk,
        "C": C,
        "L": L,
        "tail": tail,
    }


@EVERY_SETTING
def test_gathered_route_runs_only_with_2pc_tfp(setting):
    """The three-operand route needs 2-party tuples (TFP, or the TTP dealer's D-free terms) on CPU: it is taken in
    2PC TFP and 2PC TTP and nowhere else (there the model's two-operand products run, covered by the generation
    tests)."""
    K = _gathered_setup()["K"]
    taken = setting.run(_three_operand_route_available, K)[0].value
    assert taken == ((setting.cfg.n_parties, setting.cfg.protocol) == (2, "arithmetic"))


def _three_operand_route_available(sess, K):
    import crypten

    return gather_triple.available(FixedOperand.fix(crypten.cryptensor(K.float(), src=0)))


@pytest.mark.parametrize("interleave", [False, True], ids=["contiguous", "interleaved"])
@pytest.mark.parametrize("setting", ["2pc-tfp"], indirect=True)
def test_gathered_attention_matches_its_float_model(setting, interleave):
    """Three-operand products over a compact one-hot selection of a fixed cache (2PC TFP): the selected rows'
    scores, and p times the selected + always-attended rows of V, within the truncation's 2 ulp (times the few
    terms summed after it: exact in the ring before): 4 ulp; one round each, opening only the one-hot and q (then
    the attended probabilities): 8 bytes per opened element; the opened one-hot mask is a one-time pad (its bits
    ~half set: the 64 x 690 bits' mean within 0.05 of 1/2)."""
    s = _gathered_setup(interleave=interleave)
    blk, C, L, tail, idx = s["blk"], s["C"], s["L"], s["tail"], s["idx"]

    scores, out, cost, bit_mean = setting.run(_gathered_attention, s)[0].value
    V, oh = s["V"], s["oh"]
    assert err(scores, gather_triple.gathered_reference(s["q"], oh, s["K"], blk, C, blk, idx)) <= 4 * ULP
    v_rest = torch.cat([V[:, 0:blk], V[:, L - tail : L]], 1)
    assert (
        err(out, gather_triple.gathered_values_reference(s["p"], oh, V, blk, C, blk, idx, rest=(s["p_rest"], v_rest)))
        <= 4 * ULP
    )
    for name, opened in (("scores", oh.numel() + s["q"].numel()), ("values", s["p"].numel() + s["p_rest"].numel())):
        assert cost[name]["rounds"] == 1 and cost[name]["bytes_sent"] == 8 * opened, (name, cost[name])
    assert abs(bit_mean - 0.5) < 0.05


def _gathered_attention(sess, s):
    """In each party: K, V fixed, the one-hot opened (party 0 holds it), the selected scores and p·V; costs; the
    opened mask's bits."""
    import crypten

    blk, C, L, tail, idx = s["blk"], s["C"], s["L"], s["tail"], s["idx"]
    Kf, Vf = FixedOperand.fix_many(
        [crypten.cryptensor(s["K"].float(), src=0), crypten.cryptensor(s["V"].float(), src=0)]
    )
    oh = s["oh"].long() if sess.rank == 0 else torch.zeros_like(s["oh"], dtype=torch.long)
    opened = gather_triple.OpenedOneHot(ops._from_shares(oh, precision=0))
    q = crypten.cryptensor(s["q"].float(), src=0)
    p, p_rest = crypten.cryptensor(s["p"].float(), src=0), crypten.cryptensor(s["p_rest"].float(), src=0)
    v_rest = FixedOperand.cat([Vf[:, 0:blk], Vf[:, L - tail : L]], dim=1)
    with sess.scope("scores"):
        scores = gather_triple.gathered_scores(q, opened, Kf, blk, C, blk, idx)
    with sess.scope("values"):
        out = gather_triple.gathered_values(p, opened, Vf, blk, C, blk, idx, rest=(p_rest, v_rest))
    cost = {k: sess.ledger.totals(k) for k in ("scores", "values")}
    bits = torch.stack([(opened.e >> b) & 1 for b in range(64)]).double()
    return scores.get_plain_text().double(), out.get_plain_text().double(), cost, bits.mean().item()


# ---- the session's TFP provider over MPI (real mpirun) ----------------------------------------------------------
@pytest.mark.mpi
def test_lean_tfp_tuples_and_mpi_exchange(tmp_path):
    """The session's TFP provider (mpcache/mpc/lean_tfp.py) makes valid tuples with uniform-looking shares for
    party 1; openings over MPI and over gloo cost the same (bytes, rounds) and give the same value."""
    from conftest import mpi_job

    r = mpi_job(2, "lean_tfp", tmp_path)
    assert r["provider"] == "LeanTrustedFirstParty"
    for k in ("mul_ok", "matmul_ok", "and_ok", "square_ok", "b2a_ok"):
        assert r[k], (k, r)
    assert abs(r["b2a_mean"] - 0.5) < 5 / (2 * 5000**0.5), r  # 5 sigma of a fair bit's mean
    assert r["p1_share_bit_dev"] < 5 / (2 * (1 << 15) ** 0.5), r
    assert r["mpi_exchange_on"] and r["same_costs"], r
    assert r["max_diff"] <= 4 * ULP, r  # two products, each within 2 ulps
