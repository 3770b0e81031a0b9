import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any @triton.jit kernel is defined: CPU interpreter

import torch

torch.set_num_threads(1)

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MPIRUN = str(Path(sys.executable).parent / "mpirun")
_MPI_TMP: Path | None = None  # this session's folder for what mpirun and the parties write (see run_mpi)


@pytest.fixture(scope="session", autouse=True)
def mpi_tmp(tmp_path_factory) -> Path:
    """A folder under pytest's basetemp for every ``run_mpi`` launch of the session."""
    global _MPI_TMP
    _MPI_TMP = tmp_path_factory.mktemp("mpirun")
    return _MPI_TMP


def mpi_env(tmp_dir: Path | None = None) -> dict:
    """The environment of the tests' mpirun launches; temporary files go to ``tmp_dir`` (default: the session's
    folder under pytest's basetemp), never to the system temp folder.

    TMPDIR points the parties' temporary files there, and HWLOC_XMLFILE stops MPICH's hydra proxy from exporting
    its hwloc topology to a hard-coded ``/tmp/hydra_hwloc_xmlfile_XXXXXX`` (hydra ignores TMPDIR, and removes the
    file only on a clean exit: every ``MPI_Abort`` of a failure test left one behind). The named file does not
    exist, so each party's hwloc discovers the topology itself, as without hydra (the parties bind nothing)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)
    tmp = tmp_dir if tmp_dir is not None else _MPI_TMP
    if tmp is not None:
        env.update(TMPDIR=str(tmp), HWLOC_XMLFILE=str(Path(tmp) / "no-hwloc-topology.xml"))
    return env


def run_mpi(n: int, args: list[str], timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    """Launch ``mpirun -n n python ARGS`` from the repository root (real MPI, real CrypTen), in :func:`mpi_env`.
    The one place the tests start mpirun on this host: ARGS may continue an MPMD line (``... : -n 1 python ...``)."""
    p = subprocess.run(
        [MPIRUN, "-n", str(n), sys.executable, *args],
        check=False,
        cwd=ROOT,
        env=mpi_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and p.returncode != 0:
        raise AssertionError(
            f"mpirun -n {n} {' '.join(args)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
        )
    return p


def mpi_job(n: int, job: str, tmp_path, *args: str, timeout: float = 600) -> dict:
    out = tmp_path / f"{job}-{n}-{'-'.join(args)}.json"
    run_mpi(n, ["tests/mpi_jobs.py", job, str(out), *args], timeout=timeout)
    return json.loads(out.read_text())


def netem_module():
    """scripts/netem (a script, not a module) loaded as a module, for the tests that use its fabric and helpers."""
    import importlib.machinery
    import importlib.util

    loader = importlib.machinery.SourceFileLoader("netem_script", str(ROOT / "scripts" / "netem"))
    spec = importlib.util.spec_from_loader("netem_script", loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


class PublicLength:
    """What ``mpcache.generation.private_generate`` asks of the MPI communicator: the public prompt length (for
    generations run on local_parties, without MPI)."""

    def __init__(self, n: int):
        self.n = n

    def bcast(self, obj, root=0):
        return self.n

    def Barrier(self):
        return None
