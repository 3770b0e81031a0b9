"""int64 vs float64-limb ring products on CPU for the shapes SmolLM2-135M's secure forward pass uses (issue 18).

Each ring product of a fixed-operand matmul (``mpcache.mpc.fixed_operand.ring_matmul``: ``eps @ W_share``,
``a @ D``, party 0's triple ``a @ B``) is timed both ways on random ring elements, one torch thread, interleaved,
best of ``--repeat``; the weights in the layout the parties store them (``vector_layout``: column-major views of
contiguous (N, K) tensors; the embedding table row-major), the cached K^T as a transposed view. Prints one row per
shape: int64 seconds, limb seconds, the speed-up, and the route "auto" keeps (small products: int64 by rule; large:
its own first-use measurement of both, as in the parties); every limb result is checked bit for bit against int64.

    .venv/bin/python experiments/ring_matmul_bench.py                 # decode (1 row) and prefill (434 rows)
    .venv/bin/python experiments/ring_matmul_bench.py --rows 434 --repeat 5 --skip-embed
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from mpcache.mpc import fixed_operand as F

HIDDEN, INTER, VOCAB, HEADS, KV_HEADS, HEAD_DIM = 576, 1536, 49152, 9, 3, 64


def shapes(rows: int, cache: int, embed: bool) -> list[tuple[str, tuple, tuple, str]]:
    """(name, a's shape, b's shape, b's layout) of one forward step over ``rows`` new tokens, ``cache`` cached."""
    g = HEADS // KV_HEADS
    out = [
        ("q / attn_out (576x576)", (rows, HIDDEN), (HIDDEN, HIDDEN), "col"),
        ("k, v (576x192)", (rows, HIDDEN), (HIDDEN, KV_HEADS * HEAD_DIM), "col"),
        ("gate, up (576x1536)", (rows, HIDDEN), (HIDDEN, INTER), "col"),
        ("down (1536x576)", (rows, INTER), (INTER, HIDDEN), "col"),
        ("q.K^T (3 x G*rows x 64 x L)", (KV_HEADS, g * rows, HEAD_DIM), (KV_HEADS, HEAD_DIM, cache), "kt"),
        ("p.V (3 x G*rows x L x 64)", (KV_HEADS, g * rows, cache), (KV_HEADS, cache, HEAD_DIM), "row"),
    ]
    if rows == 1:
        out.append(("lm_head (576x49152, tied)", (1, HIDDEN), (HIDDEN, VOCAB), "col"))
    if embed:
        out.append(("embed one-hot (49152x576)", (rows, VOCAB), (VOCAB, HIDDEN), "row"))
    return out


def _make(gen, shape, layout):
    def r(*s):
        return torch.randint(-(2**63), 2**63 - 1, s, generator=gen, dtype=torch.long)

    if layout == "col":  # (K, N) view of a contiguous (N, K) tensor
        return r(*shape[:-2], shape[-1], shape[-2]).transpose(-2, -1)
    if layout == "kt":  # K^T of a contiguous (.., L, hd) cache
        return r(*shape[:-2], shape[-1], shape[-2]).transpose(-2, -1)
    return r(*shape)


def bench(rows_list, cache, repeat, embed) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for rows in rows_list:
        for name, sa, sb, layout in shapes(rows, cache + (rows == 1), embed):
            a, b = _make(gen, sa, "row"), _make(gen, sb, layout)
            old = F.RING_MATMUL
            ti, tl = [], []
            try:
                for _ in range(repeat):  # interleaved: both see the same machine load
                    F.RING_MATMUL = "int64"
                    t0 = time.perf_counter()
                    ref = F.ring_matmul(a, b)
                    ti.append(time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    lim = F.limb_matmul(a, b)
                    tl.append(time.perf_counter() - t0)
                    assert torch.equal(ref, lim), name
                F.RING_MATMUL = "auto"  # what the parties' first-use measurement keeps
                if F.ring_matmul_route(a.shape, b.shape) == "measure":
                    F.ring_matmul(a, b)
                pick = F.ring_matmul_route(a.shape, b.shape)
            finally:
                F.RING_MATMUL = old
            out.append(
                {
                    "phase": "decode" if rows == 1 else f"prefill ({rows} rows)",
                    "product": name,
                    "a": "x".join(map(str, sa)),
                    "b": "x".join(map(str, sb)),
                    "int64_s": min(ti),
                    "limbs_s": min(tl),
                    "speedup": min(ti) / min(tl),
                    "auto": pick,
                }
            )
            r = out[-1]
            print(
                f"{r['phase']:<20} {name:<30} {r['a']:>14} @ {r['b']:<14} int64 {r['int64_s']:9.4f} s  "
                f"limbs {r['limbs_s']:9.4f} s  x{r['speedup']:5.2f}  auto: {pick}",
                flush=True,
            )
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="1,434", help="new tokens per step (1 = decode, 434 = the demo's prefill)")
    p.add_argument("--cache", type=int, default=434, help="cached tokens (the prompt)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--skip-embed", action="store_true", help="leave out the one-hot embedding product (slow)")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    print(
        f"torch {torch.__version__}, 1 thread; limbs {F.LIMB_BITS}, exact chunks of K <= {F.LIMB_MAX_K}; auto: "
        f"int64 below {F.LIMB_MIN_ROWS} rows per batch or {F.LIMB_MIN_MACS} multiply-adds, else measured"
    )
    rows = bench([int(x) for x in a.rows.split(",")], a.cache, a.repeat, not a.skip_embed)
    print("\n| phase | product | a @ b | int64 s | limbs s | int64/limbs | auto picks |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['phase']} | {r['product']} | {r['a']} @ {r['b']} | {r['int64_s']:.4f} | {r['limbs_s']:.4f} | "
            f"{r['speedup']:.2f} | {r['auto']} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
