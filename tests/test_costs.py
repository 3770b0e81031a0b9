"""Costs predicted by dry runs of the protocols themselves (mpcache/mpc/dryrun.py: the same code on shape-only
shares, counted by the same ledger) == ledger measurements of live runs, exactly, per party: every secure protocol
at two or more shapes (odd sizes for the tree max) and whole private generations, under 2PC TFP, 2PC TTP (dealer
rank) and 3PC replicated. The schedule search's layer model (mpcache/mpc/schedules.py) == dry runs of the layer
protocol, without MPI."""

import pytest
from conftest import mpi_job
from mpi_jobs import VARIANTS

SETTINGS = [("arithmetic", "tfp", 2), ("arithmetic", "ttp", 3), ("replicated", "none", 3)]


@pytest.mark.mpi
@pytest.mark.parametrize("protocol,provider,n_procs", SETTINGS, ids=["2pc-tfp", "2pc-ttp", "3pc-rep"])
def test_op_costs_predicted_equal_measured(tmp_path, protocol, provider, n_procs):
    res = mpi_job(n_procs, "op_costs", tmp_path, protocol, provider)
    assert len(res) >= 40
    bad = [
        f"{name}: measured {r['measured']} predicted {r['predicted']}"
        for name, r in res.items()
        if r["measured"] != r["predicted"]
    ]
    assert not bad, "\n".join(bad)


# ---- whole-model prediction (a dry run of private_generate) vs a measured private generation ------------------
def _counts(ledger: dict) -> dict:
    out = {}
    for c in ledger["counts"]:
        v = (c["bytes_sent"], c["bytes_recv"], c["rounds"])
        if any(v):
            out[(c["scope"], c["kind"])] = v
    return out


def _compare_ledgers(measured: list[dict], predicted: list[dict]) -> list[str]:
    bad = []
    for r, (m, p) in enumerate(zip(measured, predicted)):
        cm, cp = _counts(m), _counts(p)
        for key in sorted(set(cm) | set(cp)):
            if key[0] == "setup":  # session setup (TTP seeds): not part of the generation
                continue
            a, b = cm.get(key, (0, 0, 0)), cp.get(key, (0, 0, 0))
            if a != b:
                bad.append(f"rank {r} {key}: measured {cm.get(key)} predicted {cp.get(key)}")
    return bad


SLOW = pytest.mark.slow  # ~1 min each on 2 busy cores; the default run keeps the mpcache cases
GEN_CASES = [
    pytest.param("arithmetic", "tfp", 2, "full", id="2pc-full", marks=SLOW),
    pytest.param("arithmetic", "tfp", 2, "mpcache", id="2pc-mpcache"),
    pytest.param("replicated", "none", 3, "full", id="3pc-full", marks=SLOW),
    pytest.param("replicated", "none", 3, "mpcache", id="3pc-mpcache"),
    pytest.param("arithmetic", "ttp", 3, "mpcache", id="2pc-ttp-mpcache", marks=SLOW),
    # the stratified selection, with a leaf cluster completed at the last step (its summary made in the
    # tournament's comparison layers) and the anchored softmax's offset from them
    pytest.param("arithmetic", "tfp", 2, "mpcache-strata", id="2pc-mpcache-strata"),
    # the pipelined dealer (mpcache/mpc/dealer.py): its requests and answers (dealer bytes, no rounds) and the
    # three-operand gathers' D-free dealer terms, predicted == measured per scope
    pytest.param("arithmetic", "ttp", 3, "mpcache-strata", id="2pc-ttp-mpcache-strata"),
    # the selection made ahead (MPCachePolicy.lookahead): layer 1's selection in branches beside layer 0's attention
    # and MLP, its gathered scores in the logits' round
    pytest.param("arithmetic", "ttp", 3, "mpcache-ahead", id="2pc-ttp-mpcache-ahead"),
]


@pytest.mark.mpi
@pytest.mark.parametrize("protocol,provider,n_procs,policy", GEN_CASES)
def test_generation_cost_predicted_equal_measured(tmp_path, protocol, provider, n_procs, policy):
    """Every scope (offline, prefill, each token, per layer and op) of every party: predicted == measured."""
    from mpcache.generation import per_token_costs
    from mpcache.model.weights import tiny_config
    from mpcache.mpc.dryrun import Setting, predict_generation
    from mpcache.policies import make_policy

    n_new, n_prompt = 3, (26 if policy.endswith(("-strata", "-ahead")) else 24)  # 26: decode steps at 27 and 28 rows
    res = mpi_job(
        n_procs, "generation_costs", tmp_path, "tiny-llama", protocol, provider, policy, str(n_new), str(n_prompt)
    )
    pol = make_policy(policy) if policy == "full" else make_policy(policy.split("-")[0], budget=0.3, **VARIANTS[policy])
    assert repr(pol) == res["policy"]
    n = n_procs - (provider == "ttp")
    pred, _ = predict_generation(tiny_config("llama"), pol, Setting(n, protocol, provider), n_prompt, n_new)
    bad = _compare_ledgers(res["ledgers"], pred)
    assert not bad, "\n".join(bad[:40])
    mt, _ = per_token_costs(res["ledgers"], n_new)
    pt, _ = per_token_costs(pred, n_new)
    for a, b in zip(mt, pt):
        assert (a["bytes_sent"], a["bytes_recv"], a["rounds"]) == (b["bytes_sent"], b["bytes_recv"], b["rounds"])


# ---- no MPI: the latency-minimising schedules, their layer model, and the ring matmul --------------------------
SETTINGS_DRY = [("arithmetic", "tfp", 2), ("replicated", "none", 3), ("arithmetic", "ttp", 2)]


def _dry_cost(setting, make, f) -> list:
    """Per-party online bytes and rounds of ``f(*make())`` in a dry run (``make`` is not counted); asserts the
    dealer's traffic has no round (the layer model leaves that traffic out: see schedules' docstring)."""
    from mpcache.mpc.dryrun import dry_party

    out = []
    for rank in range(setting.n):
        with dry_party(rank, setting) as d:
            xs = make()
            before = {k: d.ledger.totals(kind=k) for k in ("online", "dealer")}
            f(*xs)
            after = {k: d.ledger.totals(kind=k) for k in ("online", "dealer")}
        assert after["dealer"]["rounds"] == before["dealer"]["rounds"]
        out.append({f_: after["online"][f_] - before["online"][f_] for f_ in ("bytes_sent", "bytes_recv", "rounds")})
    return out


def _model_cost(cost) -> list:
    return [{f_: cost.c["online"][f_][r] for f_ in ("bytes_sent", "bytes_recv", "rounds")} for r in range(cost.n)]


@pytest.mark.parametrize("protocol,provider,n", SETTINGS_DRY, ids=["2pc-tfp", "3pc-rep", "2pc-ttp"])
def test_layer_model_equals_dry_runs(protocol, provider, n):
    """schedules.max_layer / strata_level / _lockstep (what the schedule search prices) == a dry run of the layer
    protocol itself (ops.tree_max's layers -- on a mask plan in 2PC with the lean comparison and r <= 8 -- and
    ops._onehot_radix_levels), every party, exactly."""
    from mpcache.mpc import ops, schedules
    from mpcache.mpc.dryrun import dry_share

    s = schedules.Setting(n, protocol, provider)
    for rows, m, r, lean in [
        (9, 412, 4, True),
        (1, 49152, 64, True),
        (2, 37, 5, False),
        (5, 12, 12, True),
        (1, 3, 3, False),
    ]:
        got = _dry_cost(
            s,
            lambda rows=rows, m=m: [dry_share((rows, m))],
            lambda x, r=r, ln=lean: ops.tree_max(x, -1, radix=(r, 2), lean=ln),
        )
        want, left = schedules.Cost(n), m
        for rr in schedules._radix_schedule(m, (r, 2)):  # (a mask plan's layers where 2PC runs them)
            want += schedules.max_layer(s, (rows,), left, rr, lean)
            left = -(-left // rr)
        assert got == _model_cost(want), (rows, m, r, lean)
    for rows, m, lean in [(4, 10, True), (3, 7, False), (2, 9, True)]:  # the pairwise tree: compare + mux layers
        got = _dry_cost(
            s, lambda rows=rows, m=m: [dry_share((rows, m))], lambda x, ln=lean: ops.tree_max(x, -1, radix=2, lean=ln)
        )
        want, left = schedules.Cost(n), m
        for r in schedules._radix_schedule(m, 2):
            want += schedules.max_layer(s, (rows,), left, r, lean)
            left = -(-left // r)
        assert got == _model_cost(want), (rows, m, lean)
    for tasks, lean in [([(30, 10, 1, 4)], True), ([(12, 7, 3, 3), (27, 12, 0, 4)], True), ([(6, 5, 2, 2)], False)]:

        def make(tasks=tasks):
            return [
                (dry_share((rows, nn)), None if w == 0 else dry_share((rows, nn, w), precision=0), rr)
                for rows, nn, w, rr in tasks
            ]

        got = _dry_cost(s, lambda make=make: [make()], lambda ts, ln=lean: ops._onehot_radix_levels(ts, ln))
        want = schedules._lockstep(s, tasks, lean)
        if all(schedules.masked_level(s, r, w, lean) for _, _, w, r in tasks):  # _lockstep prices the mask plan
            got = _dry_cost(
                s, lambda make=make: [make()], lambda ts, ln=lean: ops._onehot_radix_levels(ts, ln, masked=True)
            )
        assert got == _model_cost(want), (tasks, lean)
    # the strata's first level (public one-hots: nothing opened for them on a mask plan), radix 2 and 3
    for rows, nn, r in [(8, 11, 2), (5, 9, 3)]:
        masked = schedules.masked_level(s, r, 0, True)
        got = _dry_cost(
            s,
            lambda rows=rows, nn=nn: [dry_share((rows, nn))],
            lambda x, r=r, m=masked: ops._onehot_radix_levels([(x, ops.ONES, r)], True, masked=m),
        )
        assert got == _model_cost(schedules.strata_level(s, (rows,), nn, 1, r, True, ones=True)), (rows, nn, r)


def test_auto_schedules_reduce_to_one_and_beat_fixed_radices():
    """max_schedule / strata_schedule: public, deterministic, reduce the entries to one, and the modelled LAN
    latency of the protocol they drive (a dry run) is never worse than the fixed radices they replaced ((4, 4, 4,
    16) and 4)."""
    from mpcache.latency import PROFILES
    from mpcache.mpc import ops, schedules
    from mpcache.mpc.dryrun import dry_share

    lan = PROFILES["lan"]

    def t(costs):
        rounds = max(c["rounds"] for c in costs)  # (the dealer's traffic has no round: _dry_cost checks it)
        return rounds * lan.rtt_s + 8 * max(c["bytes_sent"] for c in costs) / lan.bandwidth_bps

    for protocol, provider, n in SETTINGS_DRY:
        setting = schedules.Setting(n, protocol, provider)
        for rows, m in ((9, 3), (9, 45), (9, 412), (9, 4097), (1, 49152)):
            sch = schedules.max_schedule(rows, m, True, setting)
            assert sch == schedules.max_schedule(rows, m, True, setting)
            left = m
            for r in sch:
                assert 2 <= r <= left
                left = -(-left // r)
            assert left == 1, (m, sch)
            if m > 412:
                continue  # the long rows: schedule properties only (dry runs ~1 s)

            def run(radix, rows=rows, m=m, setting=setting):
                return t(
                    _dry_cost(
                        setting, lambda: [dry_share((rows, m))], lambda x: ops.tree_max(x, -1, radix=radix, lean=True)
                    )
                )

            assert run(sch) <= run((4, 4, 4, 16)) + 1e-12, (setting, rows, m)
        for rows, g in ((300, 10), (48, 4)):
            m = g * rows // 3

            def run(radix, rows=rows, m=m, setting=setting):
                return t(
                    _dry_cost(
                        setting,
                        lambda: [dry_share((3, m))],
                        lambda x: ops.strata_top1_onehot(x, rows // 3, radix=radix),
                    )
                )

            assert run("auto") <= run(4) + 1e-12, (setting, rows, g)


def test_bytes_first_strata_select_sends_fewer_bytes():
    """``strata_select(profile=BYTES_FIRST)`` (MPCache's selection made ahead, off the critical path): the heads' max
    and the strata tournament of a 4k decode step's shape (3 KV heads x 3 query heads, 1,020 candidate clusters, 99
    strata) send fewer bytes than the LAN schedule (dry runs, every party). Both are exact (test_secure_ops)."""
    from mpcache.mpc import ops, schedules
    from mpcache.mpc.dryrun import dry_share

    for protocol, provider, n in SETTINGS_DRY:
        setting = schedules.Setting(n, protocol, provider)

        def run(profile, setting=setting):
            return _dry_cost(
                setting,
                lambda: [dry_share((3, 3, 1020))],
                lambda x: ops.strata_select(x, 99, heads=True, interleave=True, profile=profile),
            )

        lan, few = run("lan"), run(schedules.BYTES_FIRST)
        assert max(c["bytes_sent"] for c in few) < max(c["bytes_sent"] for c in lan), (setting, lan, few)
        if n == 2 and provider in ("tfp", "ttp"):  # on mask plans: at least 2x fewer
            assert 2 * max(c["bytes_sent"] for c in few) < max(c["bytes_sent"] for c in lan), (lan, few)


def test_ring_matmul_equals_torch_matmul_for_every_layout():
    """mpcache.mpc.fixed_operand.ring_matmul: bit-identical to torch.matmul on int64 (wrapping), for contiguous and
    transposed right operands, one row or several, batched left operands; results contiguous (gloo sends them)."""
    import torch

    from mpcache.mpc.fixed_operand import ring_matmul

    g = torch.Generator().manual_seed(0)

    def R(*s):
        return torch.randint(-(2**63), 2**63 - 1, s, generator=g)

    for b in (R(40, 24), R(24, 40).t()):
        for a in (R(1, 40), R(5, 40), R(3, 2, 40), R(40)):
            out = ring_matmul(a, b)
            assert torch.equal(out, torch.matmul(a, b)) and out.is_contiguous()


def test_selection_made_ahead_costs_only_layer_0s_rounds():
    """MPCachePolicy(lookahead=True): layer 1's selection runs beside layer 0's attention and MLP, so a decode step
    costs the full cache's rounds plus layer 0's own selection (half the 2-layer model's selection rounds), with the
    selection's bytes; with lookahead_start=0, layer 0's selection for the next step runs beside the last layer, so a
    steady step costs exactly the full cache's rounds. Dry runs, 2PC + dealer, the stratified route with the anchored
    offset made beside the norm."""
    from mpcache.model.weights import tiny_config
    from mpcache.mpc.dryrun import Setting, predict_generation
    from mpcache.policies import make_policy

    def token(pol, t=2):
        led, _ = predict_generation(tiny_config("llama"), pol, Setting(2, "arithmetic", "ttp"), 26, 4)
        counts = [c for c in led[0]["counts"] if c["scope"].startswith(f"token/{t}/")]
        return sum(c["rounds"] for c in counts), sum(c["bytes_sent"] for c in counts)

    full, strata, ahead, ahead0 = (
        token(None),
        token(make_policy("mpcache", budget=0.3, topk="strata", lookahead=False)),
        token(make_policy("mpcache", budget=0.3, topk="strata", lookahead=True, lookahead_start=1)),
        token(make_policy("mpcache", budget=0.3, topk="strata", lookahead=True, lookahead_start=0)),
    )
    per_layer = (strata[0] - full[0]) // 2
    assert per_layer >= 10, (full, strata)
    assert ahead[0] == full[0] + per_layer, (full, strata, ahead)
    assert ahead0[0] == full[0], (full, ahead0)
    for b in (ahead[1], ahead0[1]):
        assert abs(b - strata[1]) < 0.1 * strata[1]  # the same selection's bytes (+ the next layer's q columns)
