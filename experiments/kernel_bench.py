"""Sparse decode attention kernel vs torch dense attention vs the memory-bandwidth bound (CUDA only).

For each cache length L, one decode step of one layer: the Triton kernel gathers the selected clusters' K/V
rows (kernels/sparse_decode_attention.py); torch's scaled_dot_product_attention reads the whole cache. The bound
is the time to move the selected K/V bytes at the copy bandwidth measured on this device (device-to-device
``copy_``, counting read + write). Decode attention is bandwidth bound, so "% of bound" is the figure of merit.

    python experiments/kernel_bench.py                        # defaults below
    python experiments/kernel_bench.py --seq-lens 4096 65536 --keep-ratio 0.1 --dtype bfloat16

Writes results/kernel_bench/<UTC time>-<commit>.json (config, seed, commit, device, one row per L); never
overwrites. Without a CUDA GPU it prints that one is needed and exits 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Knobs:
    kv_heads: int = 3  # SmolLM2-135M: 3 KV heads ...
    group: int = 3  # ... shared by 3 query heads each (9 query heads)
    head_dim: int = 64
    seq_lens: list[int] = field(default_factory=lambda: [1024, 4096, 16384, 65536, 262144])
    cluster_size: int = 16  # MPCache's level-2 (fine) cluster
    keep_ratio: float = 0.2  # fraction of clusters attended to (MPCache's overall dynamic ratio, §5)
    dtype: str = "float16"  # K, V and q storage; the kernel computes in fp32
    copy_mib: int = 1024  # size of the bandwidth probe buffer; well above L2 (50 MiB on H100)
    seed: int = 0
    out_dir: str = "results/kernel_bench"


def parse_args() -> Knobs:
    knobs = Knobs()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for f in dataclasses.fields(Knobs):
        default = getattr(knobs, f.name)
        flag = "--" + f.name.replace("_", "-")
        if isinstance(default, list):
            parser.add_argument(flag, type=int, nargs="+", default=default)
        else:
            parser.add_argument(flag, type=type(default), default=default)
    return Knobs(**vars(parser.parse_args()))


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def copy_bandwidth(bench, nbytes: int, device: torch.device) -> float:
    """Device copy bandwidth in bytes/s: a copy reads and writes nbytes each."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds = bench(lambda: dst.copy_(src)) * 1e-3
    return 2 * nbytes / seconds


def bench_one(knobs: Knobs, L: int, bench, bandwidth: float, device: torch.device) -> dict:
    from kernels.sparse_decode_attention import sparse_decode_attention_reference, sparse_decode_attention_triton

    Hkv, G, D, S = knobs.kv_heads, knobs.group, knobs.head_dim, knobs.cluster_size
    dtype = getattr(torch, knobs.dtype)
    g = torch.Generator(device="cpu").manual_seed(knobs.seed + L)
    q = torch.randn(Hkv * G, D, generator=g).to(device, dtype)
    K = torch.randn(Hkv, L, D, generator=g).to(device, dtype)
    V = torch.randn(Hkv, L, D, generator=g).to(device, dtype)
    C = -(-L // S)
    k = max(1, int(knobs.keep_ratio * C))
    sel = torch.stack([torch.randperm(C, generator=g)[:k].sort().values for _ in range(Hkv)]).to(device)

    # Check before timing: a fast wrong kernel is worth nothing.
    o = sparse_decode_attention_triton(q, K, V, sel, S, L=L)
    ref = sparse_decode_attention_reference(q, K, V, sel, S, L=L)
    torch.testing.assert_close(o.float(), ref.float(), rtol=1e-2, atol=1e-2)

    sparse_ms = bench(lambda: sparse_decode_attention_triton(q, K, V, sel, S, L=L))
    q4, K4, V4 = q[None, :, None, :], K[None], V[None]  # (1, H, 1, D), (1, Hkv, L, D)
    dense_ms = bench(lambda: torch.nn.functional.scaled_dot_product_attention(q4, K4, V4, enable_gqa=True))

    el = K.element_size()
    rows = int((torch.clamp(sel * S + S, max=L) - sel * S).sum())  # gathered K (and V) rows, all KV heads
    sparse_bytes = 2 * rows * D * el + 2 * q.numel() * el + sel.numel() * sel.element_size()
    dense_bytes = 2 * Hkv * L * D * el + 2 * q.numel() * el
    bound_ms = sparse_bytes / bandwidth * 1e3
    return {
        "L": L,
        "clusters_selected": k,
        "tokens_selected_per_kv_head": rows / Hkv,
        "sparse_ms": sparse_ms,
        "dense_ms": dense_ms,
        "bound_ms": bound_ms,
        "dense_bound_ms": dense_bytes / bandwidth * 1e3,
        "sparse_GBps": sparse_bytes / sparse_ms * 1e-6,
        "pct_of_bound": 100 * bound_ms / sparse_ms,
        "speedup_vs_dense": dense_ms / sparse_ms,
    }


def main() -> int:
    knobs = parse_args()
    if not torch.cuda.is_available():
        print("kernel_bench: needs a CUDA GPU (torch.cuda.is_available() is False); nothing measured.")
        return 0
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("kernel_bench: TRITON_INTERPRET=1 would time the CPU interpreter; unset it to time compiled kernels.")
        return 0
    import triton.testing

    device = torch.device("cuda")
    torch.manual_seed(knobs.seed)
    bench = triton.testing.do_bench  # ms; flushes L2 between runs, so reads come from HBM
    bandwidth = copy_bandwidth(bench, knobs.copy_mib << 20, device)
    print(f"{torch.cuda.get_device_name(device)}: measured copy bandwidth {bandwidth * 1e-9:.0f} GB/s")
    print(
        f"{'L':>8} {'k':>6} {'sparse us':>10} {'bound us':>9} {'% bound':>8} {'GB/s':>7} {'dense us':>9} {'speedup':>8}"
    )
    rows = []
    for L in knobs.seq_lens:
        r = bench_one(knobs, L, bench, bandwidth, device)
        rows.append(r)
        print(
            f"{L:>8} {r['clusters_selected']:>6} {r['sparse_ms'] * 1e3:>10.1f} {r['bound_ms'] * 1e3:>9.1f} "
            f"{r['pct_of_bound']:>7.1f}% {r['sparse_GBps']:>7.0f} {r['dense_ms'] * 1e3:>9.1f} "
            f"{r['speedup_vs_dense']:>7.2f}x"
        )

    commit = git_commit()
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    out = REPO / knobs.out_dir / f"{stamp}-{commit}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "config": dataclasses.asdict(knobs),
        "seed": knobs.seed,
        "git_commit": commit,
        "device": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "copy_bandwidth_GBps": bandwidth * 1e-9,
        "rows": rows,
    }
    with open(out, "x") as fh:  # "x": never overwrite an earlier run
        json.dump(result, fh, indent=2)
    print(f"wrote {out.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
