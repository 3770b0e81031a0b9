"""Analytic costs (mpcache/mpc/costs.py) == ledger measurements, exactly, per party: every secure protocol at two
or more shapes (odd sizes for the tree max), under 2PC TFP, 2PC TTP (dealer rank) and 3PC replicated."""
import pytest
from conftest import mpi_job

SETTINGS = [("arithmetic", "tfp", 2), ("arithmetic", "ttp", 3), ("replicated", "tfp", 3)]


@pytest.mark.mpi
@pytest.mark.parametrize("protocol,provider,n_procs", SETTINGS, ids=["2pc-tfp", "2pc-ttp", "3pc-rep"])
def test_op_costs_predicted_equal_measured(tmp_path, protocol, provider, n_procs):
    res = mpi_job(n_procs, "op_costs", tmp_path, protocol, provider)
    assert len(res) >= 40
    bad = [f"{name}: measured {r['measured']} predicted {r['predicted']}" for name, r in res.items()
           if r["measured"] != r["predicted"]]
    assert not bad, "\n".join(bad)


# ---- whole-model prediction (mpcache/backends/cost.py) vs a measured private generation -------------------------
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
            if key[0] == "setup":                  # session setup (TTP seeds): not part of the generation
                continue
            if cm.get(key) != cp.get(key):
                bad.append(f"rank {r} {key}: measured {cm.get(key)} predicted {cp.get(key)}")
    return bad


GEN_CASES = [("arithmetic", "tfp", 2, "full"), ("arithmetic", "tfp", 2, "mpcache"),
             ("replicated", "tfp", 3, "full"), ("replicated", "tfp", 3, "mpcache"),
             ("arithmetic", "ttp", 3, "mpcache")]


@pytest.mark.mpi
@pytest.mark.parametrize("protocol,provider,n_procs,policy", GEN_CASES,
                         ids=["2pc-full", "2pc-mpcache", "3pc-full", "3pc-mpcache", "2pc-ttp-mpcache"])
def test_generation_cost_predicted_equal_measured(tmp_path, protocol, provider, n_procs, policy):
    """Every scope (offline, prefill, each token, per layer and op) of every party: predicted == measured."""
    from mpcache.backends.cost import predict_generation
    from mpcache.generation import per_token_costs
    from mpcache.model.weights import tiny_config
    from mpcache.mpc.costs import Setting
    from mpcache.policies import make_policy

    n_new, n_prompt = 3, 24
    res = mpi_job(n_procs, "generation_costs", tmp_path, "tiny-llama", protocol, provider, policy, str(n_new),
                  str(n_prompt))
    pol = make_policy(policy) if policy == "full" else make_policy(policy, budget=0.3)
    assert repr(pol) == res["policy"]
    n = n_procs - (provider == "ttp")
    pred, _ = predict_generation(tiny_config("llama"), pol, Setting(n, protocol, provider), n_prompt, n_new)
    bad = _compare_ledgers(res["ledgers"], pred)
    assert not bad, "\n".join(bad[:40])
    mt, _ = per_token_costs(res["ledgers"], n_new)
    pt, _ = per_token_costs(pred, n_new)
    for a, b in zip(mt, pt):
        assert (a["bytes_sent"], a["bytes_recv"], a["rounds"]) == (b["bytes_sent"], b["bytes_recv"], b["rounds"])
