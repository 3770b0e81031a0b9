"""scripts/netem: plan (dry run), skip path and the modelled-vs-emulated arithmetic need no root and run in
seconds; the real link check (namespaces + delay line + tbf, as root) is marked slow."""

import json
import os
import subprocess
import sys

import pytest
from conftest import netem_module

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "netem")


@pytest.mark.timeout(60)
def test_plan_prints_fabric_and_launch_without_touching_anything():
    r = subprocess.run(
        [sys.executable, SCRIPT, "plan", "--profiles", "none,lan,wan"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "ip netns add mpcnet0" in out and "ip netns add mpcnet1" in out
    assert "--delay-ms 20.0" in out and "--delay-ms 0.15" in out  # one way = RTT / 2
    assert "tbf rate 400000000bit" in out and "tbf rate 3000000000bit" in out
    assert "-launcher-exec" in out and "-hosts 10.77.0.1,10.77.0.2" in out
    assert "MPCACHE_MASTER_ADDR" not in out and "GLOO_SOCKET_IFNAME" not in out  # found over MPI, no env vars
    assert "/.venv/bin/mpirun -n 2" in out  # profile none: plain loopback run


@pytest.mark.timeout(60)
def test_skip_path_when_not_root(monkeypatch, capsys):
    mod = netem_module()
    monkeypatch.setattr(mod.os, "geteuid", lambda: 1000)
    assert "root" in mod.why_not()
    assert mod.main(["check"]) == 0
    assert "SKIP" in capsys.readouterr().out
    assert mod.main(["bench", "--skip-code", "77"]) == 77


def test_profiles_match_the_latency_model():
    from mpcache.latency import PROFILES

    mod = netem_module()
    for name, (bw, rtt) in mod.PROFILES.items():
        assert (PROFILES[name].bandwidth_bps, PROFILES[name].rtt_s) == (bw, rtt)
    assert mod.parse_profiles("none,edge=0.1:80") == [("none", None, None), ("edge", 0.1e9, 0.08)]


def test_compare_adds_network_terms_to_the_loopback_compute_time():
    mod = netem_module()
    row = {
        "policy": "full",
        "seq_len": "512",
        "layer_seconds": "1.0",
        "layer_rounds": "100",
        "layer_bytes": "5e6",
        "seconds_per_token": "10",
        "rounds_per_token": "1000",
        "bytes_per_token": "5e7",
    }
    emu = dict(row, layer_seconds="6.0", seconds_per_token="60")
    res = {"none": {"rows": [row]}, "wan": {"rows": [emu], "bandwidth_bps": 400e6, "rtt_s": 0.04}}
    layer = next(r for r in mod.compare(res) if r["level"] == "layer")
    assert layer["modelled_s"] == pytest.approx(1.0 + 100 * 0.04 + 8 * 5e6 / 400e6)
    assert layer["rel_error"] == pytest.approx(6.0 / 5.1 - 1)
    assert "| full | 512 | wan | layer |" in mod.markdown(mod.compare(res), res)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_real_link_has_the_profile_rtt():
    mod = netem_module()
    reason = mod.why_not()
    if reason:
        pytest.skip(reason)
    r = subprocess.run(
        [sys.executable, SCRIPT, "ping", "--profiles", "t=0.1:20", "--prefix", "mpcnettest"],
        capture_output=True,
        text=True,
        timeout=170,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert 19.5 < res["rtt_median_ms"] < 23, res
    assert 20 < res["throughput_mbps"] <= 105, res
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False).stdout
    assert "mpcnettest" not in listed  # cleaned up
