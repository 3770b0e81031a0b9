"""``python -m parties <job>`` under mpirun: parse, open the session, run one library job, write rank{r}.json.

Jobs: ``generate`` (private greedy generation with per-token costs and a plaintext check) and ``bench`` (secure
decode steps over a long plaintext-built, secret-shared KV cache; a benchmark convention).
"""

from __future__ import annotations

import argparse
import sys

import torch

torch.set_num_threads(
    1
)  # one torch thread per party: 2-3 parties share 2 cores (2 threads each made steps ~25x slower)


def _network(p: argparse.ArgumentParser) -> None:
    """Where the parties meet (by default found over MPI: the same command runs on one host or across hosts)."""
    n = p.add_argument_group("network (default: found over MPI; see README 'Several hosts')")
    n.add_argument(
        "--master-addr",
        default=None,
        help="rank 0's address as the other hosts reach it (default: each party probes rank 0's "
        "interfaces over TCP and takes the first that answers)",
    )
    n.add_argument(
        "--iface",
        default=None,
        help="network interface every party's gloo traffic uses (default: the one it reaches rank 0 by)",
    )
    n.add_argument("--port", type=int, default=0, help="rendezvous TCP port on rank 0 (default 0: a free one)")
    p.add_argument(
        "--mpc",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a protocol knob of mpcache.mpc.config.MpcConfig (repeatable), e.g. --mpc softmax_lean=false "
        "--mpc exp_iters=10; every party must pass the same (the handshake compares them)",
    )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m parties", description=__doc__)
    sub = p.add_subparsers(dest="job", required=True)
    g = sub.add_parser("generate", help="private greedy generation (client learns the tokens)")
    g.add_argument(
        "--model",
        default="smollm2",
        help="'smollm2' (embedded SmolLM2-135M-Instruct, 4-bit GGUF dequantized), 'tiny-llama', "
        "'tiny-gpt2' (random test configs), or a folder with config.json + *.safetensors",
    )
    g.add_argument("--seed", type=int, default=0, help="weight seed of the tiny random models")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--prompt", default=None, help="the client's prompt (default: a short question)")
    src.add_argument("--prompt-file", default=None, help="read the client's prompt from this file")
    src.add_argument(
        "--prompts",
        default=None,
        metavar="FILE",
        help="several prompts, one per line, generated one after the other by the same parties: the weights are "
        "shared (and their masks opened) once; a report and OUT/prompt<i>/ per prompt",
    )
    g.add_argument(
        "--chat",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="wrap the prompt in the model's chat template (when it has one)",
    )
    g.add_argument("--max-new-tokens", type=int, default=8)
    g.add_argument("--policy", default="full", help="cache policy (full, streaming, h2o, snapkv, tova, quest, mpcache)")
    g.add_argument(
        "--budget",
        type=float,
        default=None,
        help="fraction of the prompt kept/attended in (0, 1], or a token count > 1",
    )
    g.add_argument(
        "--layer-budgets",
        default=None,
        help="per-layer budgets (SqueezeAttention): 'calibrated' (the model's stored public calibration, made "
        "by python -m experiments.squeeze_calibrate --model M) or one budget per layer, comma-separated, "
        "summing to n_layers x --budget",
    )
    g.add_argument(
        "--protocol",
        default="arithmetic",
        choices=["arithmetic", "replicated"],
        help="arithmetic: additive sharing with Beaver triples (2 compute parties + a dealer rank by default, "
        "or 2 parties with --provider tfp); replicated: 3PC (ABY3-like, exactly 3 parties)",
    )
    g.add_argument(
        "--provider",
        default=None,
        choices=["tfp", "ttp", "none"],
        help="2PC only: tuples from a dealer process that sees no data (ttp, the 2PC default: the last MPI rank, "
        "so `mpirun -n 3`) or from party 0 (tfp: a labelled benchmark mode, NOT secure against party 0, "
        "`mpirun -n 2`). --protocol replicated is dealer-free ('none', its only and default value): leave "
        "--provider out",
    )
    g.add_argument(
        "--fixed-weights",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="fixed-operand Beaver triples for the weight matrices: open W - B once (offline), then only "
        "the moving operand travels per product (--no-fixed-weights: stock CrypTen matmuls)",
    )
    g.add_argument(
        "--fixed-kv",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the same for the cached K/V rows: each row's W - B opened once, when written; q.K^T, p.V and "
        "the one-hot gathers then open only their moving operand (--no-fixed-kv: stock matmuls)",
    )
    g.add_argument("--device", default="cpu", help="cpu or cuda (each party on its own GPU)")
    g.add_argument("--out", default="runs/generate", help="directory for rank{r}.json and summary.json")
    g.add_argument("--no-plaintext", action="store_true", help="skip the plaintext check run on rank 0")
    g.add_argument("--timeout", type=float, default=120.0, help="seconds before a silent peer is declared dead")
    g.add_argument(
        "--profile",
        action="store_true",
        help="print, per party, a decode token's wall time per op split into local compute, waiting for "
        "the peer and copies of the exchanges, with rounds and ms per round",
    )
    _network(g)
    b = sub.add_parser(
        "bench",
        help="long-context secure decode benchmark over a plaintext-built, shared KV cache "
        "(a benchmark convention, NOT an end-to-end secure run)",
    )
    b.add_argument("--model", default="smollm2", help="as for generate")
    b.add_argument("--seed", type=int, default=0, help="weight seed of the tiny random models")
    b.add_argument(
        "--seq-lens",
        default="512,1024,2048,4096,8192",
        help="cached rows at the last measured decode step, comma-separated",
    )
    b.add_argument(
        "--policies",
        default="full,mpcache",
        help="comma-separated cache policies; 'label=name' to run a registry policy under another label",
    )
    b.add_argument(
        "--budget",
        type=float,
        default=0.1,
        help="fraction of the cache attended/kept in (0, 1], or a token count > 1 (every policy but full)",
    )
    b.add_argument(
        "--layer-budgets",
        default=None,
        help="per-layer budgets (SqueezeAttention): 'calibrated' (the model's stored public calibration, made "
        "by python -m experiments.squeeze_calibrate --model M) or one budget per layer, comma-separated, "
        "summing to n_layers x --budget",
    )
    b.add_argument(
        "--topk",
        default="auto",
        choices=["rank", "strata", "auto"],
        help="how policies pick their k of m candidates on shares (default auto: the exact rank for "
        "m <= 32, the stratified tournament above); a policy's --policy-kwargs topk wins",
    )
    b.add_argument(
        "--policy-kwargs", default=None, help='JSON {label: {field: value}}, e.g. \'{"mpcache": {"cluster_size": 16}}\''
    )
    b.add_argument(
        "--layers",
        default="auto",
        help="blocks actually run: 'auto' (the fewest that contain every block cost class; 1 without "
        "layer sharing), 'all', or a count; the whole model is scaled from them exactly",
    )
    b.add_argument(
        "--text",
        default="austen",
        choices=["austen", "random"],
        help="the client's prompt: real text (Jane Austen, fetched offline) or random ids (tests)",
    )
    b.add_argument("--steps", type=int, default=2, help="measured decode steps per case (mean reported)")
    b.add_argument(
        "--warmup", type=int, default=1, help="unmeasured decode steps first (they build the cluster summaries once)"
    )
    b.add_argument(
        "--check",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="after the measured steps, open the selections and logits (a 'check' scope, benchmark "
        "only) and compare them with the same case in plaintext",
    )
    b.add_argument(
        "--baseline-softmax",
        default="ours",
        help="softmax of the full-cache baseline, comma-separated: 'ours' (the anchored lean softmax, label full) "
        "and/or 'stock' (CrypTen's own max-tree softmax, label full-stock: the kind of baseline the MPCache paper "
        "measured against; a cost baseline, wrong on long flat rows); other policies keep ours",
    )
    b.add_argument("--protocol", default="arithmetic", choices=["arithmetic", "replicated"])
    b.add_argument(
        "--provider", default=None, choices=["tfp", "ttp", "none"], help="as for generate (default: by --protocol)"
    )
    b.add_argument("--fixed-weights", action=argparse.BooleanOptionalAction, default=True)
    b.add_argument("--device", default="cpu")
    b.add_argument("--out", default="runs/bench", help="directory for bench.csv, bench.md, bench.json, rank{r}.json")
    b.add_argument("--timeout", type=float, default=600.0, help="seconds before a silent peer is declared dead")
    _network(b)
    return p


def _resolved(run):
    """``run(args)`` after ``--provider`` is resolved from ``--protocol`` (a refusal is a SessionError: a clear
    message and a non-zero exit, from every party)."""

    def job(args):
        from mpcache.mpc.session import resolve_provider

        args.provider = resolve_provider(args.protocol, args.provider)
        return run(args)

    return job


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    from mpcache.mpc.session import run_party

    if args.job == "generate":
        from parties.generate import run

        return run_party(_resolved(run), args)
    if args.job == "bench":
        from parties.bench import run

        return run_party(_resolved(run), args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
