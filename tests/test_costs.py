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
