"""The cache-independent floor of a token (issue "a lower floor"): the coarse lane comparison and the activations
built on it, each against its float model, with its stated per-element cost measured on real parties (2PC with
the lean TFP tuples, 3PC replicated)."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch

from mpcache.mpc import ops
from mpcache.mpc.activations import GELU_T, SILU_T
from mpcache.mpc.compare import _ltz_lanes, and_planes_2pc, block_size, ltz_lanes_reference
from mpcache.mpc.local_parties import Parties

ULP = 2.0**-16
SETTINGS = {"2pc": (2, "arithmetic"), "3pc": (3, "replicated")}


@pytest.fixture(scope="module", params=list(SETTINGS))
def parties(request):
    n, protocol = SETTINGS[request.param]
    with Parties(n, protocol=protocol, timeout=300) as p:
        yield p


def grid(x):
    return torch.round(x.double() * 2**16) / 2**16


def _run(sess, cases):
    import crypten

    out = {}
    for name, (op, x) in cases.items():
        share = crypten.cryptensor(x.float(), src=0)
        with sess.scope(name):
            y = op(share)
        c = sess.ledger.totals(name, kind="online")
        out[name] = (y.get_plain_text().double(), c["rounds"], c["bytes_sent"])
    return out


def run(parties, cases):
    return parties.run(_run, cases)[0].value


def test_lane_comparison_is_exact_but_one_ulp_of_its_scale(parties):
    """[x < 0] by 16-bit lanes at 1/16 resolution (and 8-bit lanes at 1/8, 32-bit exact): exact for x < 0 and for
    x >= (n - 1) ulps of the coarse scale; in between it may read 1 (one-sided), never outside. Edges of the range
    included (|x| < 2^(shift + width - 1) - n 2^shift)."""
    n = parties.n
    x = grid((torch.randn(3, 301, generator=torch.Generator().manual_seed(0)) * 500).clamp(-2000, 2000))
    x[0, :10] = torch.tensor([0.0, ULP, -ULP, 1 / 16, -1 / 16, 1 / 32, 2030.0, -2030.0, (n - 1) / 16, -1.0])
    small = grid(torch.randn(2, 77, generator=torch.Generator().manual_seed(1)) * 4)
    out = run(
        parties,
        {
            "w16": (partial(_ltz_lanes, width=16, shift=12), x),
            "w32": (partial(_ltz_lanes, width=32, shift=0), x),
            "w8": (partial(_ltz_lanes, width=8, shift=13), small),
            "lean": (ops._ltz_lean, x),
            "w16 wide": (partial(_ltz_lanes, width=16, shift=12), x.repeat(1, 20)),  # blocks of 2 (compare.block_size)
        },
    )
    for name, v, scale_ulp in (("w16", x, 1 / 16), ("w8", small, 1 / 8), ("w16 wide", x.repeat(1, 20), 1 / 16)):
        got, exact = out[name][0], (v < 0).double()
        worst = ltz_lanes_reference(v, *((8, 13) if name == "w8" else (16, 12)), n=n)
        assert torch.all((got == exact) | (got == worst)), name  # one of the two models, elementwise
        window = (v >= 0) & (v < (n - 1) * scale_ulp)
        assert torch.equal(got[~window], exact[~window]), name  # exact outside the one-sided window
    assert torch.equal(out["w32"][0], (x < 0).double())
    assert out["w32"][1:] == out["lean"][1:]  # the lean comparison is the 32-bit-lane case, cost for cost
    # stated costs (2PC), bit-sliced: per word of 64 elements, AND planes x 2 x 8 B + the B2A's packed opening (8 B);
    # this size takes blocks of 4 (width 32: 213 planes, ~53 B per element, 5 rounds; 16: 90, ~22.6 B, 4; 8: 29, 3),
    # the wide one blocks of 2 (width 16: 45 planes, ~11.4 B per element, 5 rounds)
    if n == 2:
        for k, (width, block, count, rounds) in {
            "w32": (32, 4, 213, 5),
            "w16": (16, 4, 90, 4),
            "w8": (8, 4, 29, 3),
            "w16 wide": (16, 2, 45, 5),
        }.items():
            N = out[k][0].numel()
            assert block_size(width, N) == block and sum(and_planes_2pc(width, block)) == count, k
            assert out[k][2] == -(-N // 64) * (16 * count + 8), (k, out[k][2])
            assert out[k][1] == rounds, (k, out[k][1])
    else:  # party 2's share to party 0 (1), then as 2PC: blocks (1) + levels + B2A (1)
        assert [out[k][1] for k in ("w32", "w16", "w8", "w16 wide")] == [6, 5, 4, 6]


@pytest.mark.parametrize("act", ["silu", "gelu"])
def test_activation_split(parties, act):
    """x/2 + a Chebyshev even part inside +-T and |x|/2 beyond, breakpoints by the coarse comparison. Against the
    float model: a few ulps per Chebyshev doubling (errors x4 per level, 3 levels, coefficients < 2.5: 400 ulp),
    except within (n - 1)/16 below T in |x|, where the coarse comparison may pick the tail piece (then within the
    model's own bound of the exact function). Against the exact function: the model's bound (SiLU 2.7e-3 at |x| = 8,
    GeLU 8.1e-4) + the fixed-point error."""
    n = parties.n
    T = SILU_T if act == "silu" else GELU_T
    x = grid(torch.cat([torch.linspace(-14, 14, 561), torch.tensor([T, -T, T - 1 / 32, -T + 1 / 32, 60.0, -60.0])]))
    op, ref = getattr(ops, act), getattr(ops, f"{act}_reference")
    exact = torch.nn.functional.silu(x) if act == "silu" else torch.nn.functional.gelu(x, approximate="tanh")
    bound = 2.7e-3 if act == "silu" else 8.1e-4
    out = run(
        parties,
        {
            act: (op, x),
            "other input": (op, grid(torch.randn(x.numel()) * 5)),
            "sequential": (partial(_no_lockstep, op), x),
        },
    )
    y, rounds, sent = out[act]
    near = (x.abs() <= T) & (x.abs() > T - (n - 1) / 16)
    assert (y - ref(x))[~near].abs().max() <= 400 * ULP
    assert (y - exact)[~near].abs().max() <= bound + 2e-4
    # within the window the coarse comparison may pick the tail piece x/2 + |x|/2 = relu(x): its own error there
    # (3PC's window is 1/8 wide: 3.0e-3 at |x| = 7.875 for SiLU)
    tail = (x.clamp(min=0) - exact)[near].abs().max()
    assert (y - exact)[near].abs().max() <= max(bound, float(tail)) + 2e-4
    assert (ref(x) - exact).abs().max() <= bound + 1e-5
    assert out["other input"][1:] == (rounds, sent)  # costs do not depend on the secret input
    # the lockstep run (comparison and polynomial in shared exchanges) and the sequential one: the same function
    # within the same bounds (their randomness is drawn in another order: truncation ulps differ), the same bytes
    assert (out["sequential"][0] - ref(x))[~near].abs().max() <= 400 * ULP
    assert out["sequential"][2] == sent, (out["sequential"][2], sent)
    if n == 2:  # 2PC on open-once masks (mpcache/mpc/masked.py): 2 comparisons (blocks of 4 at this size: 90 AND
        # planes and the B2A word per 64 elements, 16 x 90 + 8 B a word each; their bits come out as the plan's bit
        # slots) + 8 B per opened value (SiLU: x, u, T2, T3, T4; GeLU: no T4); rounds: the comparison's 4 in lockstep
        # with the openings A-D, the output local
        words = -(-2 * x.numel() // 64)
        opened = 5 if act == "silu" else 4
        assert sent == words * (16 * 90 + 8) + 8 * opened * x.numel(), sent
        assert (rounds, out["sequential"][1]) == (4, 8)


def _silu_gate(xu):
    return ops.silu(xu[0], gate=xu[1])


def _product(xu):
    return xu[0] * xu[1]


def test_silu_times_its_gate(parties):
    """The gated MLP's SiLU(g) * u (2PC: the gate opened beside x, the polynomial in one more round, the output one
    local sum; 3PC: SiLU, then the product): against the float model silu_reference(g) * u
    within the activation's 400 ulp times |u| (+ the products' few ulps), outside the comparison's window."""
    n = parties.n
    g = torch.Generator().manual_seed(4)
    x = grid(torch.cat([torch.linspace(-14, 14, 281), torch.randn(256, generator=g) * 4]))
    u = grid(torch.randn(x.numel(), generator=g) * 3)
    xu = torch.stack([x, u])
    out = run(parties, {"gated": (_silu_gate, xu), "silu": (ops.silu, x), "product": (_product, xu)})
    y, rounds, sent = out["gated"]
    want = ops.silu_reference(x) * u.double()
    near = (x.abs() <= SILU_T) & (x.abs() > SILU_T - (n - 1) / 16)
    assert ((y - want).abs() <= 400 * ULP * u.double().abs() + 8 * ULP)[~near].all(), (y - want).abs().max()
    assert rounds == out["silu"][1] + out["product"][1], (rounds, out["silu"][1])
    if n == 2:  # open-once masks: the gate and the polynomial p opened (round E) besides SiLU's values: as many bytes
        # as SiLU, then the product: stated ~101 B on a decode row
        assert sent == out["silu"][2] + 16 * x.numel(), (sent, out["silu"][2])
        assert sent / x.numel() <= 102, sent / x.numel()


def _no_lockstep(op, x):
    import dataclasses

    from mpcache.mpc.config import MpcConfig

    return op(x, cfg=dataclasses.replace(MpcConfig.current(), lockstep=False))


def _anchored(x, guard):
    import dataclasses

    from mpcache.mpc.config import MpcConfig

    return ops.softmax(x, anchor=(4, 8), cfg=dataclasses.replace(MpcConfig.current(), anchor_guard=guard))


def test_anchored_softmax_guard_holds_beyond_the_bound(parties):
    """A crafted decode row whose max exceeds its anchors' max by 15 (beyond ops.ANCHOR_MAX_EXCESS = 10, where the
    unguarded anchored softmax loses its scale) and one 25 above (where the exp of the unclamped entry, computed in
    lockstep with the guard's comparison, overflows and is replaced whole by e^G): with
    the guard the output is the softmax of the row clamped at anchor max + 10 (its float model) within the
    anchored softmax's tolerance (2048 ulp: see test_anchored_softmax) plus the one-sided window's effect (none
    here: no entry lies within 1/8 below the bound), a distribution summing to 1 within the reciprocal's scale
    error at D = G: r = 1/(sum / sqrt(m)) is a fixed-point value of only 1/(r / ulp) relative resolution there (two
    entries at e^10 in a 300-entry row: r ~ 26 ulps, ~4%), so the sum is within 1.5 ulps of r, relative, + 0.5%;
    without the guard, far off."""
    import dataclasses

    from mpcache.mpc.config import MpcConfig

    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 300, generator=g)
    x[:, :4] += 4.0
    x[0, 100] = x[0, list(range(4)) + list(range(292, 300))].max() + 15.0
    x[1, 200] = x[1, list(range(4)) + list(range(292, 300))].max() + 25.0
    x[1, 201] = x[1, 200] - 3.0  # above the bound too: clamped to the same weight
    x = grid(x)
    cfg = dataclasses.replace(MpcConfig(), anchor_guard=10.0)
    want = ops.softmax_reference(x, anchor=(4, 8), cfg=cfg)
    amax = x[:, list(range(4)) + list(range(292, 300))].max(-1, keepdim=True).values
    assert torch.allclose(want, torch.softmax(torch.minimum(x, amax + 10.0), -1), atol=2e-3)  # the stated model
    out = run(
        parties,
        {"guarded": (partial(_anchored, guard=10.0), x), "unguarded": (partial(_anchored, guard=None), x)},
    )
    got = out["guarded"][0]
    assert (got - want).abs().max() <= 2048 * ULP
    e = ops.exp_limit_reference(
        torch.minimum(x.double(), amax + 10.0) - amax, iters=cfg.anchor_exp_iters, order=cfg.anchor_exp_order
    )
    r = 1 / (e.sum(-1) / math.sqrt(x.shape[-1]))  # the reciprocal's value per row: its resolution is ULP / r
    assert ((got.sum(-1) - 1).abs() <= 1.5 * ULP / r + 5e-3).all(), (got.sum(-1), ULP / r)
    assert (out["unguarded"][0] - torch.softmax(x, -1)).abs().max() > 0.05  # what the guard prevents
    cmp = 5 + (parties.n > 2)  # a 16-bit-lane comparison in blocks of 2 (3PC: + the hand-over of party 2's share)
    # the guard's rounds: 1 product; its comparison travels inside the exp's 10 rounds (lockstep, 2PC's openings;
    # 3PC's resharing is not merged: + the comparison)
    assert out["guarded"][1] == out["unguarded"][1] + (1 if parties.n == 2 else cmp + 1)


def _causal_rows(T: int, seed: int):
    """Attention-like causal rows of a T-token prompt (the last 64 query rows: row i attends [0, T - 64 + i]):
    high sinks, a retrieval peak 6 above the anchors in one row, ties; the public causal mask."""
    g = torch.Generator().manual_seed(seed)
    R = 64
    x = torch.randn(2, R, T, generator=g) * 2
    x[..., :4] += 5.0
    x[0, 10, T // 2] = 14.0
    mask = (torch.arange(T)[None, :] <= torch.arange(T - R, T)[:, None]).float()
    return grid(x), mask


def test_causal_anchored_softmax(parties):
    """The prefill's causal rows with the anchored softmax (anchors: each row's first 4 and last 8 attended
    columns): against its float model within the anchored tolerance (2048 ulp), the float model against the exact
    masked softmax within the limit exp's renormalised error (0.02, as for decode rows); masked entries exactly 0;
    rounds independent of the length but for the reciprocal's range (its one comparison grows by a bit per octave, and
    its first round's blocks shrink with the rows: 29 and 30 rounds in 2PC), and from 1,024 columns
    fewer bytes than the row-max masked softmax (the guard's 60 B per entry cost more than a short row's tree)."""
    cases = {}
    for T in (256, 1024):
        x, mask = _causal_rows(T, T)
        cases[f"anchored {T}"] = (partial(ops.softmax, mask=mask, anchor=(4, 8)), x)
        cases[f"row max {T}"] = (partial(ops.softmax, mask=mask), x)
    out = run(parties, cases)
    for T in (256, 1024):
        x, mask = _causal_rows(T, T)
        got, rounds, _ = out[f"anchored {T}"]
        ref = ops.softmax_reference(x, mask=mask, anchor=(4, 8))
        exact = torch.softmax(x.masked_fill(mask == 0, float("-inf")), -1)
        assert (got - ref).abs().max() <= 2048 * ULP, T
        assert (ref - exact).abs().max() <= 0.02, T
        assert torch.all(got[..., mask == 0] == 0)
        assert rounds < out[f"row max {T}"][1], (T, rounds, out[f"row max {T}"][1])
    assert 0 <= out["anchored 1024"][1] - out["anchored 256"][1] <= 1
    assert out["anchored 1024"][2] < out["row max 1024"][2]  # 2PC: 23.1 vs 25.8 MB (at 256: 7.8 vs 7.7)


def test_reciprocal_sliced_guess(parties):
    """1/x over [2^-3, 2^22] (the anchored softmax's guarded range) with the sliced guess: every threshold in ONE
    bit-sliced comparison layer as wide as the range (approx.sliced_window: 35 bits at 2^-7 of the smallest
    threshold), no product: against the float model (Goldschmidt: ~1 ulp per step, relative to 1/x) and the exact
    1/x; at most CrypTen's comparison's rounds for less than half its bytes per element."""
    x = grid(2.0 ** torch.linspace(-3, 22.9, 400, dtype=torch.float64))
    x[:4] = torch.tensor([2.0**12, 2.0**12 - 1, 2.0**12 + 1, 2.0**15])
    x[4:8] = torch.tensor([2.0**-3, 2.0**-3 * 1.004, 2.0**22.99, 2.0**-2.75])  # range edges, just above a threshold
    lo, hi, q = -3, 22, 2
    out = run(
        parties,
        {
            "sliced": (partial(ops.reciprocal_gs, lo=lo, hi=hi, q=q, lean="sliced"), x),
            "crypten": (partial(ops.reciprocal_gs, lo=lo, hi=hi, q=q, lean=False), x),
        },
    )
    ref = ops.reciprocal_gs_reference(x, lo=lo, hi=hi, q=q)
    got = out["sliced"][0]
    assert ((got - ref).abs() <= 8 * ULP + 1e-3 * ref).all()
    assert ((ref * x - 1).abs() <= 1e-6).all()
    assert ((got - out["crypten"][0]).abs() <= 8 * ULP + 1e-3 * ref).all()
    assert out["sliced"][1] <= out["crypten"][1]
    if parties.n == 2:
        assert out["sliced"][2] < 0.5 * out["crypten"][2], (out["sliced"][2], out["crypten"][2])


# ---- a decode step's offset beside its norm (Transformer._decode_offset / _fix_and_score) ------------------------
def _no_offset(monkeypatch):
    from mpcache.model.transformer import Transformer

    monkeypatch.setattr(Transformer, "_offset_ok", lambda self, i, cache: False)


def test_decode_offset_is_the_same_function(monkeypatch):
    """In the clear (where the plain route is the reference: ``PlainBackend.early_offset`` is False) the early
    offset and the fused fixing + logits change nothing but the order of the work: the same logits (float32
    rounding) as the plain route, on a 24-token prompt (the anchored route needs >= 12
    cached rows) and 4 decode steps of tiny-llama and of a SmolLM2-shaped GQA block (3 query heads per KV head)."""
    import dataclasses

    from mpcache.backends.plain import PlainBackend
    from mpcache.generation import plaintext_generate
    from mpcache.model.weights import init_random_weights, tiny_config

    for cfg in (tiny_config("llama"), dataclasses.replace(tiny_config("llama"), n_heads=6, n_kv_heads=2)):
        w = init_random_weights(cfg, 3)
        ids = torch.randint(0, cfg.vocab_size, (24,), generator=torch.Generator().manual_seed(5)).tolist()
        toks0, logits0, _ = plaintext_generate(cfg, w, ids, 5)  # the plaintext backend's own route
        with monkeypatch.context() as m:
            m.setattr(PlainBackend, "early_offset", True)
            toks, logits, _ = plaintext_generate(cfg, w, ids, 5)
        assert toks == toks0
        assert max((a - b).abs().max().item() for a, b in zip(logits, logits0)) < 1e-4


def test_decode_offset_saves_6_rounds_per_layer(monkeypatch):
    """Dry run (the protocols themselves, no data), 2PC, tiny-llama after a 24-token prompt: the offset's
    products and comparison layer beside the norm (1 + 1 + 5 rounds at the (4, 4) anchors: one radix-8 max layer on
    a mask plan, inside the norm's 9 with the q/k/v product), the offset's scaling and the new row's fixing beside
    the logits: from the norm to p V 9 + 1 + 17 + 1 = 28 rounds (norm with q/k/v, the logits with the fixing and the
    offset, the softmax from its offset, p V), against 9 + 1 + 1 + 22 + 1 = 34 (norm with q/k/v, the fixing, the
    logits, the softmax with its anchors' max, p V)."""
    from mpcache.model.weights import tiny_config
    from mpcache.mpc.dryrun import Setting, predict_generation

    cfg = tiny_config("llama")

    def token(ledgers):
        led = ledgers[0]
        rounds = sum(c["rounds"] for c in led["counts"] if c["kind"] == "online" and c["scope"].startswith("token/2/"))
        attn = {}
        for c in led["counts"]:
            if c["kind"] == "online" and c["scope"].startswith("token/2/L0/"):
                part = c["scope"].split("/")[3]
                attn[part] = attn.get(part, 0) + c["rounds"]
        return rounds, attn, {c["scope"] for c in led["counts"]}

    fast, attn, scopes = token(predict_generation(cfg, None, Setting(), 24, 3)[0])
    with monkeypatch.context() as m:
        _no_offset(m)
        slow, attn0, scopes0 = token(predict_generation(cfg, None, Setting(), 24, 3)[0])
    # the route: the new row is fixed inside the logits' round (qk), not in its own
    assert not any(s.startswith("token/2/L0/fix_kv") for s in scopes)
    assert any(s.startswith("token/2/L0/fix_kv") for s in scopes0)
    assert slow - fast == 6 * cfg.n_layers, (slow, fast)
    pre = ("norm", "qkv", "fix_kv", "qk", "softmax", "av")
    mlp_norm = 9  # the block's second norm shares the "norm" scope
    assert sum(attn.get(k, 0) for k in pre) == 28 + mlp_norm, (attn, attn0)
    assert sum(attn0.get(k, 0) for k in pre) == 34 + mlp_norm, (attn, attn0)


def test_greedy_decoding_skips_the_final_norm():
    """When only the next token is read (no logits kept: ``Transformer.argmax_only``), an RMSNorm model's head
    multiplies x / 2^8 instead of the normalised row -- the logits times a positive factor, the same argmax -- and
    the final norm's 9 rounds (2PC) are gone; with the logits kept (tests, verify), the norm runs. Dry run,
    tiny-llama; the tokens of the route are checked against plaintext by the private generation tests (job
    ``oblivious``, ``generation_costs``: no logits kept)."""
    from mpcache.model.weights import tiny_config
    from mpcache.mpc.dryrun import Setting, predict_generation

    cfg = tiny_config("llama")

    def head(keep):
        led = predict_generation(cfg, None, Setting(), 24, 3, keep_logits=keep)[0][0]
        rows = [c for c in led["counts"] if c["kind"] == "online" and c["scope"].startswith("token/2/lm_head")]
        return {c["scope"] for c in rows}, sum(c["rounds"] for c in rows)

    (scopes, rounds), (scopes_kept, rounds_kept) = head(False), head(True)
    assert not any("rsqrt" in s for s in scopes) and any("rsqrt" in s for s in scopes_kept)
    assert rounds_kept - rounds == 9, (rounds, rounds_kept)


def test_paterson_stockmeyer_is_the_same_polynomial():
    """``_chebyshev_ps`` (B0 + T3 (B1 + T3 B2), what 2PC SiLU/GeLU evaluate: 48 / 32 B less per element) is the
    Chebyshev series itself: on u in [-1, 1] the two agree to float64 rounding for SiLU's and GeLU's fits and random
    series of degree 3..8, and its coefficients stay small (|B| < 2.5 for the fits: the basis keeps fixed-point
    errors small)."""
    from mpcache.mpc.activations import GELU_CHEB, SILU_CHEB, _chebyshev, _chebyshev_ps, _ps_coeffs

    u = torch.linspace(-1, 1, 2001, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    series = [SILU_CHEB, GELU_CHEB] + [torch.randn(d + 1, generator=g).tolist() for d in range(3, 9)]
    for c in series:
        assert (_chebyshev_ps(u, c) - _chebyshev(u, c)).abs().max() < 1e-12 * (1 + sum(abs(v) for v in c))
    for c in (SILU_CHEB, GELU_CHEB):
        assert max(abs(v) for b in _ps_coeffs(tuple(c)) for v in b) < 2.5
    assert _ps_coeffs(tuple(GELU_CHEB))[2][1:] == (0.0, 0.0)  # degree 6: T3 B2 is a public product


def test_bit_planes_and_the_blocks_layout_in_the_clear():
    """The bit-sliced comparison's local parts against plain integer arithmetic: :func:`bit_planes` (also across its
    chunks) and :func:`unpack_bits` invert each other; for every width up to 33 and blocks of 1..4 positions, the
    2PC first round's cross products (:func:`_block_layout`, evaluated in the clear: a = party 0's bits, b = party
    1's) followed by the carry levels give the carry into the top bit of a + b, i.e. the sign of the sum."""
    from mpcache.mpc import compare

    g = torch.Generator().manual_seed(3)
    v = torch.randint(-(2**62), 2**62, (70_001,), generator=g)
    old = compare._PLANE_CHUNK
    try:
        compare._PLANE_CHUNK = 64 * 100  # several chunks
        planes = compare.bit_planes(v, 40)
    finally:
        compare._PLANE_CHUNK = old
    assert torch.equal(planes, compare.bit_planes(v, 40))
    back = sum(compare.unpack_bits(planes[j], v.numel()) << j for j in range(40))
    assert torch.equal(back, v & ((1 << 40) - 1))

    def clear_blocks(pa, pb, m, k):  # _blocks_2pc with the AND done in the clear
        left, right, gterms, pterms, plocal, _ = compare._block_layout(m, k)
        ea = torch.cat([pa[:m], torch.full_like(pa[:1], -1)])
        eb = torch.cat([pb[:m], torch.full_like(pb[:1], -1)])
        prods = compare._monomials(ea, left) & compare._monomials(eb, right)
        prods = torch.cat([prods, torch.zeros_like(prods[:1])])
        G = compare._xor_rows(prods, gterms)
        P = compare._monomials(ea, plocal) ^ compare._monomials(eb, plocal) ^ compare._xor_rows(prods, pterms)
        return G, P

    def clear_levels(G, P):
        while G.shape[0] > 1:
            p = G.shape[0] // 2
            Gn = G[1 : 2 * p : 2] ^ (P[1 : 2 * p : 2] & G[0 : 2 * p : 2])
            Pn = P[1 : 2 * p : 2] & P[0 : 2 * p : 2]
            if G.shape[0] % 2:
                Gn, Pn = torch.cat([Gn, G[-1:]]), torch.cat([Pn, P[-1:]])
            G, P = Gn, Pn
        return G[0]

    for width in (2, 3, 5, 8, 16, 25, 32, 33):
        a, b = torch.randint(0, 2**width, (2, 300), generator=g)
        pa, pb = compare.bit_planes(a, width), compare.bit_planes(b, width)
        m = width - 1
        for k in (1, 2, 3, 4):
            G, P = clear_blocks(pa, pb, m, k)
            sign = pa[m] ^ pb[m] ^ clear_levels(G, P)
            want = ((a + b) >> (width - 1)) & 1
            assert torch.equal(compare.unpack_bits(sign, 300), want), (width, k)
    assert compare.and_planes_2pc(16, 2) == [34, 7, 3, 1] and compare.and_planes_2pc(32, 4) == [202, 7, 3, 1]
