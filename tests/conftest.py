import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any @triton.jit kernel is defined: CPU interpreter

import torch

torch.set_num_threads(1)

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MPIRUN = str(Path(sys.executable).parent / "mpirun")


def run_mpi(n: int, args: list[str], timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    """Launch ``mpirun -n n python ARGS`` from the repository root (real MPI, real CrypTen)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)
    p = subprocess.run([MPIRUN, "-n", str(n), sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"mpirun -n {n} {' '.join(args)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n"
                             f"{p.stderr[-3000:]}")
    return p


def mpi_job(n: int, job: str, tmp_path, *args: str, timeout: float = 600) -> dict:
    out = tmp_path / f"{job}-{n}-{'-'.join(args)}.json"
    run_mpi(n, ["tests/mpi_jobs.py", job, str(out), *args], timeout=timeout)
    return json.loads(out.read_text())
