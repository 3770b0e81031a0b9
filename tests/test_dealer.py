"""The pipelined 2PC dealer (mpcache/mpc/dealer.py, ``--provider ttp``) with real CrypTen parties and a real dealer
process (mpcache/mpc/local_parties.py), and under real mpirun for the failure cases.

Why one file (~510 lines): one protocol's tests (tuples, gathers, generation, request stream, failures) sharing
the module's parties (TFP and TTP, forked once).

What is checked: the tuples it deals open to valid tuples (several requests outstanding before one opening
included); every protocol's ONLINE bytes and rounds equal TFP's exactly, the dealer's traffic is dealer bytes with
no round, of the size the cost model says; the three-operand gathers under TTP (D-free dealer terms) equal their
float model and cost TFP's online bytes/rounds; a private generation (full cache and MPCache's strata selection,
whose attention takes the gathers) gives the plaintext tokens with TFP's online cost per token, and its ledgers and
its whole request stream to the dealer are identical for two different secret inputs, made of public values only;
the dealer sleeps between requests; a dead dealer or a wrong world size stops every party with a clear message,
nothing written to --out."""

from __future__ import annotations

import pickle
import time
from pathlib import Path

import pytest
import torch
from conftest import PublicLength
from test_secure_ops import _gathered_setup  # the same fixed K/V and one-hot

from mpcache.mpc.local_parties import Parties, PartyFailure

ULP = 2.0**-16


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def grid(x: torch.Tensor) -> torch.Tensor:
    return torch.round(x.double() * 2**16) / 2**16


@pytest.fixture(scope="module")
def both():
    """2PC TFP and 2PC TTP parties, kept for the module."""
    with Parties(2, provider="tfp", timeout=300) as tfp, Parties(2, provider="ttp", timeout=300) as ttp:
        yield {"tfp": tfp, "ttp": ttp}


def _costs(sess, name: str) -> dict:
    return {k: sess.ledger.totals(name, kind=k) for k in ("online", "dealer")}


# ---- tuples, several outstanding, every protocol family -----------------------------------------------------------
def _ops(sess, xs):
    """Each case on shares of xs (party 0 inputs them): opened value and this party's online/dealer costs."""
    import crypten

    from mpcache.mpc import ops
    from mpcache.mpc.fixed_operand import FixedOperand, fixed_matmul

    x, y, w = (crypten.cryptensor(t.float(), src=0) for t in xs)
    with sess.scope("fix"):
        wf = FixedOperand.fix(w)
    cases = {
        "mul": lambda: x * y,
        "matmul": lambda: x.matmul(y.t()),
        "square": lambda: x.square(),
        "ltz": lambda: x._ltz(),
        "ltz_lean": lambda: ops._ltz_lean(x),
        "fixed_matmul": lambda: fixed_matmul(x, wf),
        "fixed_matmul_T": lambda: fixed_matmul(y[:, :5], wf.t()),
        "tree_max": lambda: ops.tree_max(x, -1),
        "softmax": lambda: ops.softmax(x),
    }
    out = {}
    for name, f in cases.items():
        with sess.scope(name):
            z = f()
        out[name] = (z.get_plain_text().double(), _costs(sess, name))
    return out


def _outstanding(sess, n_triples: int):
    """Several tuples drawn (several requests outstanding at the dealer) before ONE batched opening of all their
    parts; returns the opened (a, b, c) of each and the opening's costs."""
    import crypten
    import crypten.communicator as comm
    import torch.distributed as dist

    prov = crypten.mpc.get_default_provider()
    with sess.scope("draw"):
        arith = [prov.generate_additive_triple((3, 5), (3, 5), "mul") for _ in range(n_triples)]
        arith.append(prov.generate_additive_triple((4, 6), (6, 2), "matmul"))
        binary = [prov.generate_binary_triple((2, 7), (2, 7)) for _ in range(n_triples)]
        r, r2 = prov.square((5,))
        rA, rB = prov.B2A_rng((9,))
    with sess.scope("open"):  # what a protocol opens after drawing: the parts that mask its inputs (a, b, r, rB)
        masks = comm.get().all_reduce([t.share for tri in arith for t in tri[:2]] + [r.share], batched=True)
        bmasks = comm.get().all_reduce(
            [t.share for tri in binary for t in tri[:2]] + [rB.share], batched=True, op=dist.ReduceOp.BXOR
        )
    # the answers (c, r^2, rA) are used only after that opening: opened here, for the check
    cs = comm.get().all_reduce([tri[2].share for tri in arith] + [r2.share, rA.share], batched=True)
    bcs = comm.get().all_reduce([tri[2].share for tri in binary], batched=True, op=dist.ReduceOp.BXOR)
    opened = [x for i in range(len(arith)) for x in (masks[2 * i], masks[2 * i + 1], cs[i])] + [
        masks[-1],
        cs[-2],
        cs[-1],
    ]
    bits = [x for i in range(n_triples) for x in (bmasks[2 * i], bmasks[2 * i + 1], bcs[i])] + [bmasks[-1]]
    return {
        "arith": [opened[3 * i : 3 * i + 3] for i in range(len(arith))],
        "square": opened[-3:-1],
        "b2a": (opened[-1], bits[-1]),
        "binary": [bits[3 * i : 3 * i + 3] for i in range(n_triples)],
        "costs": {k: _costs(sess, k) for k in ("draw", "open")},
    }


def test_several_requests_outstanding_before_one_opening(both):
    """Seven tuples of four kinds drawn before one opening (seven requests in flight at the dealer): every one opens
    to a valid tuple; drawing costs party 0 only dealer bytes, no round; the opening is one round each way."""
    from mpcache.mpc.dealer import pool_batches, request_nbytes

    res = both["ttp"].run(_outstanding, 3)
    r0 = res[0].value
    for a, b, c in r0["arith"][:-1]:
        assert torch.equal(a * b, c)
    a, b, c = r0["arith"][-1]
    assert torch.equal(a @ b, c)
    for a, b, c in r0["binary"]:
        assert torch.equal(a & b, c)
    r, r2 = r0["square"]
    assert torch.equal(r * r, r2)
    rA, rB = r0["b2a"]
    assert torch.equal(rA, rB) and set(rA.unique().tolist()) <= {0, 1}
    # every kind is pooled: per signature, batches of answers (pool_batches), each asked in one frame (its request
    # + 5 bytes); drawn here without a device: None in the request, as CrypTen's provider would send it
    sigs = [  # (uses, answer elements, request bytes)
        (3, 15, request_nbytes("additive", None, (3, 5), (3, 5), "mul")),
        (1, 8, request_nbytes("additive", None, (4, 6), (6, 2), "matmul")),
        (3, 14, request_nbytes("binary", None, (2, 7), (2, 7))),
        (1, 5, request_nbytes("square", None, (5,))),
        (1, 9, request_nbytes("B2A", None, (9,))),
    ]
    batches = [pool_batches(uses, numel) for uses, numel, _ in sigs]
    assert batches[0] == [1, 1, 2] and batches[1] == [1, 1]  # the first needed now, then ahead
    want_sent = sum(len(b) * (req + 5) for b, (_, _, req) in zip(batches, sigs))
    want_recv = 8 * sum(sum(b) * numel for b, (_, numel, _) in zip(batches, sigs))
    d0, d1 = r0["costs"]["draw"], res[1].value["costs"]["draw"]
    calls = sum(len(b) for b in batches)
    assert d0["dealer"] == {"bytes_sent": want_sent, "bytes_recv": want_recv, "rounds": 0, "calls": calls}
    assert d0["online"]["calls"] == 0 and d1["online"]["calls"] == d1["dealer"]["calls"] == 0
    for p in res:
        assert p.value["costs"]["open"]["online"]["rounds"] == 2 and p.value["costs"]["open"]["dealer"]["calls"] == 0


def test_every_protocol_costs_tfps_online_bytes_and_rounds(both):
    """Products, squares, comparisons (ANDs + B2A), fixed-operand products, a tree max and the softmax: the same
    values as in plaintext (within the truncation's ulps / the approximations' tolerance, as TFP) and, per party,
    exactly TFP's online bytes and rounds; the dealer's traffic is party 0's, bytes only, no round."""
    g = gen(1)
    xs = [
        grid(torch.randn(3, 8, generator=g)),
        grid(torch.randn(3, 8, generator=g)),
        grid(torch.randn(8, 5, generator=g)),
    ]
    res = {p: [r.value for r in both[p].run(_ops, xs)] for p in ("tfp", "ttp")}
    x, y, w = (t.double() for t in xs)
    exact = {
        "mul": x * y,
        "matmul": x @ y.T,
        "square": x * x,
        "ltz": (x < 0).double(),
        "ltz_lean": (x < 0).double(),
        "fixed_matmul": x @ w,
        "tree_max": x.max(-1).values,
        "softmax": None,  # its float model, below
    }
    from mpcache.mpc import ops

    exact["softmax"] = ops.softmax_reference(x)
    tol = {"softmax": 2048 * ULP}  # the reference models the approximations; shares add truncation noise
    for name, want in exact.items():
        for p in ("tfp", "ttp"):
            got = res[p][0][name][0]
            assert (got - want).abs().max().item() <= tol.get(name, 4 * ULP), (p, name)
    for name in res["tfp"][0]:
        for rank in range(2):
            t, d = res["tfp"][rank][name][1], res["ttp"][rank][name][1]
            assert d["online"] == t["online"], (name, rank, t, d)
            assert d["dealer"]["rounds"] == 0, (name, rank, d)
            assert (d["dealer"]["bytes_recv"] > 0) == (rank == 0), (name, rank, d)


# ---- the three-operand gathers under TTP -----------------------------------------------------------------------
def _gathered(sess, s):
    import crypten

    from mpcache.mpc import gather_triple, ops
    from mpcache.mpc.fixed_operand import FixedOperand

    blk, C, L, tail, idx = s["blk"], s["C"], s["L"], s["tail"], s["idx"]
    Kf, Vf = FixedOperand.fix_many(
        [crypten.cryptensor(s["K"].float(), src=0), crypten.cryptensor(s["V"].float(), src=0)]
    )
    oh = s["oh"].long() if sess.rank == 0 else torch.zeros_like(s["oh"], dtype=torch.long)
    q = crypten.cryptensor(s["q"].float(), src=0)
    p, p_rest = crypten.cryptensor(s["p"].float(), src=0), crypten.cryptensor(s["p_rest"].float(), src=0)
    v_rest = FixedOperand.cat([Vf[:, 0:blk], Vf[:, L - tail : L]], dim=1)
    with sess.scope("scores"):
        opened = gather_triple.OpenedOneHot(ops._from_shares(oh, precision=0))
        scores = gather_triple.gathered_scores(q, opened, Kf, blk, C, blk, idx)
    with sess.scope("values"):
        out = gather_triple.gathered_values(p, opened, Vf, blk, C, blk, idx, rest=(p_rest, v_rest))
    costs = {k: _costs(sess, k) for k in ("scores", "values")}
    return scores.get_plain_text().double(), out.get_plain_text().double(), costs, gather_triple.available(Kf)


def test_gathered_attention_under_ttp_equals_float_model_at_tfp_cost(both):
    """The three-operand products with the dealer's D-free terms: the selected rows' scores and p times the selected
    + always-attended rows of V within 4 ulp of the float model (the truncation's 2, as TFP); one round each, the
    same online bytes as TFP (8 per opened element: the one-hot and q, then the probabilities); the dealer's answer
    exactly the D-free terms' sizes (gather_triple's docstring), no round."""
    from mpcache.mpc import gather_triple

    s = _gathered_setup()
    blk, C, L, tail, idx, V, oh = s["blk"], s["C"], s["L"], s["tail"], s["idx"], s["V"], s["oh"]
    want_s = gather_triple.gathered_reference(s["q"], oh, s["K"], blk, C, blk, idx)
    v_rest = torch.cat([V[:, 0:blk], V[:, L - tail : L]], 1)
    want_o = gather_triple.gathered_values_reference(s["p"], oh, V, blk, C, blk, idx, rest=(s["p_rest"], v_rest))
    res = {p: [r.value for r in both[p].run(_gathered, s)] for p in ("tfp", "ttp")}
    hkv, G, d = s["q"].shape
    k, g = idx.shape
    for p in ("tfp", "ttp"):
        scores, out, costs, available = res[p][0]
        assert available
        assert (scores - want_s).abs().max().item() <= 4 * ULP, p
        assert (out - want_o).abs().max().item() <= 4 * ULP, p
        assert costs["scores"]["online"]["bytes_sent"] == 8 * (oh.numel() + s["q"].numel())
        assert costs["values"]["online"]["bytes_sent"] == 8 * (s["p"].numel() + s["p_rest"].numel())
        assert costs["scores"]["online"]["rounds"] == costs["values"]["online"]["rounds"] == 1
    for rank in range(2):
        for name in ("scores", "values"):
            assert res["tfp"][rank][2][name]["online"] == res["ttp"][rank][2][name]["online"], (rank, name)
    dealer = res["ttp"][0][2]
    sizes_s = gather_triple.score_term_sizes(hkv, G, k, g, blk, d)
    sizes_v = gather_triple.value_term_sizes(hkv, G, k, g, blk, d)
    assert dealer["scores"]["dealer"]["bytes_recv"] == 8 * sum(torch.Size(z).numel() for z in sizes_s)
    assert dealer["values"]["dealer"]["bytes_recv"] == 8 * sum(torch.Size(z).numel() for z in sizes_v)
    assert dealer["scores"]["dealer"]["rounds"] == dealer["values"]["dealer"]["rounds"] == 0


# ---- a whole private generation: plaintext tokens, TFP's online cost, a public request stream -------------------
def _generate(sess, policy: str, seed: int, prompt_seed: int, n_prompt: int, n_new: int):
    """A private generation of tiny-llama; returns tokens, per-token online/dealer costs of this party, and (party 0)
    every request payload it sent to the dealer, as sent."""
    from mpcache.generation import private_generate
    from mpcache.model.weights import load_model
    from mpcache.mpc import dealer
    from mpcache.policies import make_policy

    cfg, w, _ = load_model("tiny-llama", seed=seed)
    pol = make_policy(policy) if policy == "full" else make_policy("mpcache", budget=0.3, topk="strata")
    ids = torch.randint(0, cfg.vocab_size, (n_prompt,), generator=gen(prompt_seed)).tolist()
    sent: list[bytes] = []
    if sess.provider == "ttp" and sess.rank == 0:
        c = dealer.client()
        post = type(c)._post

        def spy(self, payload, *args, **kwargs):
            sent.append(bytes(payload))
            return post(self, payload, *args, **kwargs)

        c._post = spy.__get__(c)
    sess.comm = PublicLength(n_prompt)
    try:
        toks, _, _ = private_generate(
            sess, cfg, w if sess.rank == 0 else None, ids if sess.rank == 1 else None, n_new, pol
        )
    finally:
        sess.comm = None
        if sent:
            del dealer.client()._post
    per_token = [{k: sess.ledger.totals(f"token/{t}", kind=k) for k in ("online", "dealer")} for t in range(n_new)]
    scopes = sorted(
        (p, k, tuple(c[f] for f in ("bytes_sent", "bytes_recv", "rounds"))) for (p, k), c in sess.ledger.counts.items()
    )
    return {"tokens": toks, "per_token": per_token, "scopes": scopes, "requests": sent, "ids": ids, "seed": seed}


def _plaintext(policy, seed, prompt_seed, n_prompt, n_new):
    from mpcache.generation import plaintext_generate
    from mpcache.model.weights import load_model
    from mpcache.policies import make_policy

    cfg, w, _ = load_model("tiny-llama", seed=seed)
    pol = make_policy(policy) if policy == "full" else make_policy("mpcache", budget=0.3, topk="strata")
    ids = torch.randint(0, cfg.vocab_size, (n_prompt,), generator=gen(prompt_seed)).tolist()
    return plaintext_generate(cfg, w, ids, n_new, pol)[0]


def _rebased(msgs: list) -> list:
    """The request stream with the fixed masks' keys counted from the stream's first (the key counter is per
    process: a second session in the same parties starts where the first stopped)."""
    base = msgs[0][2][0][0][0]  # the first request registers the first mask: ("fixed_register", dev, ([(k, size)],))

    def spec(x):
        if isinstance(x, tuple) and len(x) == 2 and x[0] == "key":
            return ("key", x[1] - base)
        return tuple(spec(v) for v in x) if isinstance(x, tuple) else x

    out = []
    for func, dev, args, kwargs in msgs:
        if func == "fixed_register":
            args = (tuple((k - base, size) for k, size in args[0]),)
        elif func in ("gather_scores", "gather_values"):
            args = (args[0] - base, *spec(args[1:]))
        else:
            args = spec(args)
        out.append((func, dev, args, kwargs))
    return out


def _only_public(obj) -> bool:
    if obj is None or isinstance(obj, (str, int, float)):
        return True
    if isinstance(obj, tuple):
        return all(_only_public(v) for v in obj)
    if isinstance(obj, dict):
        return all(_only_public(k) and _only_public(v) for k, v in obj.items())
    return False


@pytest.mark.parametrize("policy", ["full", "mpcache-strata"])
def test_generation_under_ttp_costs_tfps_online_and_tells_the_dealer_only_public_values(both, policy):
    """tiny-llama, 26-token prompt, 3 tokens (MPCache with the strata selection: its attention takes the
    three-operand gathers). Under TTP: the plaintext tokens; per decode token each party's online bytes and rounds
    equal TFP's; dealer bytes but no dealer round. Two different secret inputs (weights and prompt), each in fresh
    parties: identical ledgers (every scope, kind, bytes, rounds) and a byte-identical request stream to the
    dealer (pooled batch sizes included), every request
    made only of strings, integers and tuples (nothing else unpickles) -- what the dealer receives is public."""
    from mpcache.mpc import dealer

    n_prompt, n_new = 26, 3
    runs = {"tfp": both["tfp"].run(_generate, policy, 0, 7, n_prompt, n_new)}
    for name, seed, ps in (("ttp", 0, 7), ("ttp2", 1, 8)):  # fresh parties each: the same state (empty pools)
        with Parties(2, provider="ttp", timeout=300) as fresh:
            runs[name] = fresh.run(_generate, policy, seed, ps, n_prompt, n_new)
    for name, seed, ps in (("ttp", 0, 7), ("ttp2", 1, 8)):
        assert runs[name][1].value["tokens"] == _plaintext(policy, seed, ps, n_prompt, n_new), name
    for rank in range(2):
        t, d = runs["tfp"][rank].value["per_token"], runs["ttp"][rank].value["per_token"]
        for tok in range(1, n_new):
            assert d[tok]["online"] == t[tok]["online"], (rank, tok, t[tok], d[tok])
            assert d[tok]["dealer"]["rounds"] == 0
            assert (d[tok]["dealer"]["bytes_recv"] > 0) == (rank == 0)
        assert runs["ttp"][rank].value["scopes"] == runs["ttp2"][rank].value["scopes"], rank
    streams = []
    for run in ("ttp", "ttp2"):  # every request, decoded by the dealer's unpickler (loading any class raises)
        frames = [dealer.decode_frame(payload) for payload in runs[run][0].value["requests"]]
        msgs = [m for m, _ in frames]
        assert msgs and all(_only_public(m) for m in msgs)
        streams.append(list(zip(_rebased(msgs), [n for _, n in frames])))  # and the pooled batch sizes
    assert any(n is not None for _, n in streams[0]) and any(n is None for _, n in streams[0])
    assert streams[0] == streams[1]  # the same requests, in the same order, for two different secret inputs
    funcs = {m[0] for m, _ in streams[0]}
    assert {"additive", "binary", "B2A", "fixed_triple"} <= funcs
    if policy != "full":
        assert {"gather_scores", "gather_values"} <= funcs
    with pytest.raises(TypeError, match="public sizes and specs"):
        dealer.encode("additive", "cpu", (torch.zeros(2),))
    with pytest.raises(dealer.DealerError):
        dealer.decode(pickle.dumps(torch.Size([2])))


# ---- the dealer process: sleeps between requests; dies loudly -----------------------------------------------------
def _product(sess):
    import crypten

    x = crypten.cryptensor(torch.ones(4), src=0)
    return (x * x).get_plain_text()


def _cpu_seconds(pid: int) -> float:
    import os

    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_the_dealer_sleeps_between_requests():
    """Between requests the dealer blocks in gloo's receive, asleep: 2 s idle cost it < 0.1 s of CPU."""
    with Parties(2, provider="ttp", timeout=60) as parties:
        parties.run(_product)
        pid = parties._procs[2].pid
        c0 = _cpu_seconds(pid)
        time.sleep(2.0)
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        used = _cpu_seconds(pid) - c0
        assert used < 0.1, used
        assert state == "S", state
        assert torch.equal(parties.run(_product)[0].value, torch.ones(4))


def test_a_dealer_that_dies_fails_the_call(monkeypatch):
    """The dealer exits after 3 requests (the MPCACHE_DEALER_EXIT_AFTER test hook): the call fails, naming the
    dealer, within seconds (not the transport's timeout)."""
    monkeypatch.setenv("MPCACHE_DEALER_EXIT_AFTER", "3")
    t0 = time.monotonic()

    def fn(sess):
        import crypten

        x = crypten.cryptensor(torch.ones(4), src=0)
        for _ in range(6):
            x = x * x
        return x.get_plain_text()

    from mpcache.mpc.local_parties import run_parties

    with pytest.raises(PartyFailure, match=r"dealer"):
        run_parties(2, fn, provider="ttp", timeout=60)
    assert time.monotonic() - t0 < 30


@pytest.mark.mpi
@pytest.mark.parametrize(
    "hook,needle",
    [
        ("MPCACHE_DEALER_EXIT_AFTER", "exiting after 40 requests"),
        ("MPCACHE_DEALER_HANG_AFTER", "no answer from the dealer (rank 2) for 10 s"),
    ],
    ids=["dies", "hangs"],
)
def test_failed_dealer_stops_every_party_under_mpirun(tmp_path, hook, needle):
    """mpirun, 2 parties + a dealer that dies (or stops answering) after 40 requests, mid-prefill: non-zero exit, a
    message naming the dealer, within the session timeout (--timeout 10) plus startup, nothing in --out."""
    import os
    import subprocess
    import sys

    from conftest import MPIRUN, ROOT, mpi_env

    out = tmp_path / "out"
    args = ["-m", "parties", "generate", "--model", "tiny-llama", "--provider", "ttp", "--max-new-tokens", "2"]
    args += ["--timeout", "10", "--out", str(out)]
    env = dict(mpi_env(), **{hook: "40"})
    t0 = time.time()
    p = subprocess.run(
        [MPIRUN, "-n", "3", sys.executable, *args],
        check=False,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    dt = time.time() - t0
    assert p.returncode != 0
    text = p.stdout + p.stderr
    assert "dealer" in text and needle in text, text[-3000:]
    assert dt < 10 + 60, dt
    assert not out.exists() or not any(os.scandir(out))


@pytest.mark.mpi
@pytest.mark.parametrize(
    "n,needle",
    [(2, "launch with `mpirun -n 3"), (4, "launch 3 parties with --protocol replicated")],
    ids=["one-compute-party", "three-compute-parties"],
)
def test_wrong_world_size_for_the_dealer_is_explained(tmp_path, n, needle):
    """--provider ttp needs exactly 2 compute parties + the dealer: refused before any work, the fix named."""
    from conftest import run_mpi

    out = tmp_path / "out"
    args = ["-m", "parties", "generate", "--model", "tiny-llama", "--provider", "ttp", "--out", str(out)]
    p = run_mpi(n, args, timeout=120, check=False)
    assert p.returncode != 0 and needle in p.stderr, p.stderr[-2000:]
    assert not out.exists()
