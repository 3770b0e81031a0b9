"""Parties on distinct hosts: three network namespaces (scripts/netem's fabric, no shaping), one address each, an
mpirun hostfile, and nothing else -- no environment variable tells the parties where rank 0 is. The run must print
the same tokens, bytes and rounds as the loopback run. Needs root + ip netns + /dev/net/tun: skipped (with the
reason) where the machine cannot make namespaces. The bad-input cases (an interface that does not exist, a port
already taken) run anywhere."""

import json
import os
import socket
import subprocess
import sys

import pytest
from conftest import MPIRUN, ROOT, netem_module, run_mpi
from conftest import mpi_env as conftest_mpi_env

pytestmark = pytest.mark.mpi

NETEM = os.path.join(ROOT, "scripts", "netem")
GEN = [
    "-m",
    "parties",
    "generate",
    "--model",
    "tiny-llama",
    "--prompt",
    "hosts",
    "--max-new-tokens",
    "3",
    "--no-plaintext",
]


TFP = ["--provider", "tfp"]  # two ranks: the benchmark provider (the default 2PC takes a dealer rank)


def mpi_env(tmp_path, **extra) -> dict:
    """The environment of a hand-built mpirun line: conftest.run_mpi's (temporary files to tmp_path, no hydra
    topology file in /tmp) plus ``extra``."""
    return {**conftest_mpi_env(tmp_path), **extra}


def _costs(out) -> tuple:
    s = json.loads((out / "summary.json").read_text())
    rows = [s["offline"], s["prefill"], *s["per_token"]]
    return s["tokens"], [(r["bytes_sent"], r["bytes_recv"], r["rounds"]) for r in rows]


@pytest.fixture(scope="module")
def fabric():
    netem = netem_module()
    reason = netem.why_not()
    if reason:
        pytest.skip(f"cannot make network namespaces here: {reason}")
    fab = netem.Fabric("mpcmh", 3, None, 0.0).open()
    yield netem, fab
    fab.close()


@pytest.mark.timeout(400)
@pytest.mark.parametrize(
    "n,extra",
    [(2, ["--provider", "tfp"]), (3, ["--protocol", "replicated"]), (3, [])],  # 3 ranks, no flag: 2PC + dealer
    ids=["2pc", "3pc", "2pc-dealer"],
)
def test_hostfile_run_across_namespaces_equals_loopback(fabric, tmp_path, n, extra):
    netem, fab = fabric
    hostfile = tmp_path / "hosts"
    hostfile.write_text("".join(f"{netem.addr(i)}\n" for i in range(n)))
    run_mpi(n, [*GEN, *extra, "--out", str(tmp_path / "loop")], timeout=180)
    env = mpi_env(tmp_path, NETEM_PREFIX=fab.prefix)  # the ssh stand-in's setting, not the parties'
    cmd = [
        "ip",
        "netns",
        "exec",
        f"{fab.prefix}0",
        MPIRUN,
        "-f",
        str(hostfile),
        "-launcher",
        "ssh",
        "-launcher-exec",
        NETEM,
        "-iface",
        netem.DEV,
        "-n",
        str(n),
        sys.executable,
        *GEN,
        *extra,
        "--out",
        str(tmp_path / "hosts-run"),
    ]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    assert _costs(tmp_path / "hosts-run") == _costs(tmp_path / "loop")
    assert "10.77.0.1" in p.stdout  # the run header names where the parties met


@pytest.mark.timeout(120)
def test_unknown_interface_is_refused(tmp_path):
    p = run_mpi(2, [*GEN, *TFP, "--iface", "nosuchif0", "--out", str(tmp_path / "x")], timeout=100, check=False)
    assert p.returncode != 0
    assert "--iface 'nosuchif0' is not an IPv4 interface on host" in p.stderr and socket.gethostname() in p.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.timeout(120)
def test_taken_port_is_refused(tmp_path):
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        s.listen(1)
        port = s.getsockname()[1]
        p = run_mpi(2, [*GEN, *TFP, "--port", str(port), "--out", str(tmp_path / "x")], timeout=100, check=False)
    assert p.returncode != 0
    assert f"cannot listen on TCP port {port}" in p.stderr and "pass a free --port" in p.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.timeout(120)
def test_different_code_is_refused_at_startup(tmp_path):
    """Rank 1 runs from a copy of the code with one changed file (MPMD launch): refused at the handshake."""
    import shutil

    copy = tmp_path / "other"
    for pkg in ("mpcache", "parties", "kernels"):
        shutil.copytree(os.path.join(ROOT, pkg), copy / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    with open(copy / "mpcache" / "latency.py", "a") as f:
        f.write("\n# a different build\n")
    args = [*GEN, *TFP, "--out", str(tmp_path / "x")]
    p = run_mpi(1, [*args, ":", "-n", "1", "-wdir", str(copy), sys.executable, *args], timeout=100, check=False)
    assert p.returncode != 0
    assert "handshake failed" in p.stderr and "  code: rank 0" in p.stderr and "same commit" in p.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.timeout(120)
def test_unreachable_rank0_is_refused(tmp_path):
    """A --master-addr the other party cannot reach (TEST-NET-1): every party exits non-zero within seconds, the
    message names both hosts and the fix."""
    p = run_mpi(2, [*GEN, *TFP, "--master-addr", "192.0.2.1", "--out", str(tmp_path / "x")], timeout=100, check=False)
    assert p.returncode != 0
    assert "cannot reach rank 0 on host" in p.stderr and "192.0.2.1" in p.stderr and "--master-addr" in p.stderr
    assert not (tmp_path / "x").exists()
