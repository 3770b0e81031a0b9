"""The cache-independent floor's ops, one at a time, side by side in one run: bytes, rounds, seconds and error.

Issue 17's floor: a decode token's cost outside attention is SiLU (x its gate), the norms and the vocabulary argmax.
For each op and shape -- ``decode`` (one row: SmolLM2's 1,536 gate inputs, 576 norm inputs, 49,152 logits) and
``prefill`` (``--rows`` rows of the same, the argmax excepted: it runs once per token) -- every variant runs on the
same secret-shared input in the same parties (:func:`mpcache.mpc.local_parties.run_parties`: the protocols' real
code over a real transport, the ledger's exact counts), per setting (2PC + dealer, the default; 2PC TFP, the
benchmark mode; 3PC dealer-free). Variants:

* ``silu`` / ``silu x gate``: the op as the setting runs it (``default``: with 2 parties and TFP or the dealer, every
  value opened once on the open-once masks of :mod:`mpcache.mpc.masked`, session 13; 3PC: its Beaver form), the
  Beaver forms forced: the polynomial in its Paterson-Stockmeyer form (``ps``: the 2PC default of sessions 11-12, in
  lockstep with the comparison) and the Chebyshev doubling (``doubling``: before session 11, 3PC's default);
* ``gelu``: the same three (degree 6: the same rounds);
* ``norm``: RMSNorm's v / sqrt(sum v^2 + D eps) (``norm_scale``: 9 rounds on a 2PC decode row since session 13,
  10 over many rows);
* ``argmax``: the index of the vocabulary's first maximum (``argmax_index``).

Per row: bytes sent per element (party 0's online traffic, per input element), rounds, party 0's wall seconds, and
max abs error against the op's float model and against the exact function (SiLU/GeLU: torch's; norm: float64;
argmax: the index itself, 0 = exact; SiLU/GeLU against their model: up to the gap between the two pieces where
the coarse comparison's window next to +-T picks the tail, ~4e-3, inside the bound against the exact function).
Inputs: N(0, 3^2) gate inputs with a few at +-12 (both tails), N(0, 1) norm
rows with one massive activation (2.2e4, SmolLM2's), N(0, 2^2) logits.

    python experiments/floor_bench.py                         # 2PC + dealer, 2PC TFP, 3PC (~3 min)
    python experiments/floor_bench.py --settings dealer --rows 64

Writes results/floor_bench/<UTC time>-<commit>/{config.json, results.csv, results.md}; never overwrites.
"""

from __future__ import annotations

import argparse
import sys
import time
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from experiments.decode_scaling import md_table, new_run_dir, write_csv

SETTINGS = {  # name: (parties, protocol, provider, trust model)
    "dealer": (2, "arithmetic", "ttp", "2PC + dealer (secure default)"),
    "tfp": (2, "arithmetic", "tfp", "2PC TFP (benchmark mode, insecure)"),
    "3pc": (3, "replicated", None, "3PC replicated, dealer-free"),
}


def _act(name: str, ps: bool | None, gated: bool):
    """(secure op on shares (x, gate), float model (x, gate)) of one activation variant: ops.silu / ops.gelu as the
    setting runs them (``ps`` None) or with the Beaver polynomial's form forced (``ps``)."""
    from mpcache.mpc import ops

    fn = ops.silu if name == "silu" else ops.gelu
    ref = ops.silu_reference if name == "silu" else ops.gelu_reference
    kw = {} if ps is None else {"ps": ps}
    if gated:
        return (lambda x, g: fn(x, gate=g, **kw)), (lambda x, g: ref(x) * g)
    return (lambda x, g: fn(x, **kw)), (lambda x, g: ref(x))


def cases(rows: int) -> list[dict]:
    import torch

    from mpcache.mpc import ops

    g = torch.Generator().manual_seed(0)

    def grid(x):
        return torch.round(x.double() * 2**16) / 2**16

    out = []
    for shape, n in (("decode", 1), ("prefill", rows)):
        x = torch.randn(n, 1536, generator=g) * 3
        x[:, :4] = torch.tensor([12.0, -12.0, 8.5, -8.5])
        gate = torch.randn(n, 1536, generator=g)
        x, gate = grid(x), grid(gate)
        silu = torch.nn.functional.silu(x)
        gelu = torch.nn.functional.gelu(x, approximate="tanh")
        for act, exact in (("silu", silu), ("gelu", gelu)):
            for gated in (False, True) if act == "silu" else (False,):
                for variant, ps in (("default", None), ("ps", True), ("doubling", False)):
                    op, ref = _act(act, ps, gated)
                    out.append(
                        {
                            "op": f"{act} x gate" if gated else act,
                            "variant": variant,
                            "shape": shape,
                            "fn": op,
                            "inputs": (x, gate),
                            "model": ref(x, gate),
                            "exact": exact * gate if gated else exact,
                        }
                    )
        v = torch.randn(n, 576, generator=g)
        v[:, 7] = 2.2e4
        v = grid(v)
        add = 576 * 1e-5
        out.append(
            {
                "op": "norm",
                "variant": "norm_scale",
                "shape": shape,
                "fn": partial(ops.norm_scale, add=add),
                "inputs": (v,),
                "model": ops.norm_scale_reference(v, add),
                "exact": v / ((v**2).sum(-1, keepdim=True) + add).sqrt(),
            }
        )
    logits = grid(torch.randn(1, 49152, generator=g) * 2)
    idx = logits.argmax(-1, keepdim=True).double()
    out.append(
        {
            "op": "argmax",
            "variant": "argmax_index",
            "shape": "decode",
            "fn": ops.argmax_index,
            "inputs": (logits,),
            "model": idx,
            "exact": idx,
        }
    )
    return out


def _run_all(sess, todo):
    """In each party: every case on fresh shares of its inputs, scoped by index; (opened outputs, seconds)."""
    import crypten

    outs = []
    for i, c in enumerate(todo):
        shares = [crypten.cryptensor(x.float(), src=0) for x in c["inputs"]]
        t0 = time.perf_counter()
        with sess.scope(f"case{i}"):
            y = c["fn"](*shares)
        dt = time.perf_counter() - t0
        outs.append((y.get_plain_text().double(), dt))
    return outs


def measure(setting: str, rows: int) -> list[dict]:
    import torch

    from mpcache.mpc.local_parties import run_parties

    n, protocol, provider, trust = SETTINGS[setting]
    todo = cases(rows)
    res = run_parties(n, lambda sess: _run_all(sess, todo), protocol=protocol, provider=provider, timeout=1800)
    p0 = res[0]
    table = []
    for i, c in enumerate(todo):
        y, dt = p0.value[i]
        cost = p0.ledger.totals(f"case{i}", kind="online")
        elems = int(torch.Size(c["inputs"][0].shape).numel())
        table.append(
            {
                "setting": trust,
                "op": c["op"],
                "variant": c["variant"],
                "shape": f"{c['shape']} ({tuple(c['inputs'][0].shape)})",
                "B_per_element": round(cost["bytes_sent"] / elems, 1),
                "rounds": cost["rounds"],
                "seconds": round(dt, 3),
                "err_vs_model": float((y - c["model"]).abs().max()),
                "err_vs_exact": float((y - c["exact"]).abs().max()),
            }
        )
    return table


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--settings", default="dealer,tfp,3pc", help=f"comma-separated, of {sorted(SETTINGS)}")
    p.add_argument("--rows", type=int, default=128, help="rows of the prefill shape (a prompt's tokens)")
    p.add_argument("--out", default="results/floor_bench")
    a = p.parse_args(argv)
    settings = [s for s in a.settings.split(",") if s]
    bad = [s for s in settings if s not in SETTINGS]
    if bad or a.rows < 1:
        p.error(f"unknown settings {bad} (use {sorted(SETTINGS)}); --rows must be >= 1")
    rows = []
    for s in settings:
        rows += measure(s, a.rows)
        print(f"  measured {SETTINGS[s][3]}", flush=True)
    out = new_run_dir(a.out, {"settings": settings, "rows": a.rows})
    cols = list(rows[0])
    write_csv(out / "results.csv", rows, cols)
    fmt = {"err_vs_model": lambda v: f"{v:.2e}", "err_vs_exact": lambda v: f"{v:.2e}"}
    text = (
        "# The floor's ops, side by side (bytes: party 0's online bytes sent per input element)\n\n"
        + md_table(rows, cols, fmt)
        + "\n"
    )
    (out / "results.md").write_text(text)
    print(text)
    print(f"wrote {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
