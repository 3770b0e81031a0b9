"""The ``bench`` job: long-context secure decode steps over a plaintext-built, secret-shared KV cache.

A BENCHMARK CONVENTION, NOT AN END-TO-END SECURE RUN (see :mod:`mpcache.bench`): the prompt's prefill is run in
plaintext and its K/V cache shared as the client's input; static eviction and the decode steps run on shares.
Rank 0 writes ``OUT/bench.csv``, ``OUT/bench.md`` and ``OUT/bench.json``; every rank its ledger ``rank{r}.json``.

Who reads the weights: the model owner (rank 0), which shares them, and -- the convention -- the client (rank 1),
which builds the prompt's K/V cache in plaintext; a third party or the dealer loads the public part alone. The
convention is named in every output: the first line on stderr, the ``convention`` column of ``bench.csv``, the
head of ``bench.md`` and ``bench.json``.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import json
import os
import sys
import time

#: how the benchmark departs from an end-to-end private run (in every output)
CONVENTION = (
    "benchmark convention, not an end-to-end private run: the client holds the plaintext weights to build the "
    "prompt's K/V cache (prefill in plaintext), shared as its input; static eviction and decode run on shares"
)


STOCK_LABEL = "full-stock"  # the full cache with CrypTen's stock softmax (--baseline-softmax stock)


def _policies(args, cfg):
    """``--policies full,mpcache,strata=mpcache`` (label=registry name) with ``--budget`` and ``--policy-kwargs``."""
    from mpcache.mpc.session import SessionError
    from mpcache.policies import make_policy
    from mpcache.policies.squeeze import parse_layer_budgets

    try:
        extra = json.loads(args.policy_kwargs) if args.policy_kwargs else {}
    except json.JSONDecodeError as e:
        raise SessionError(
            f'--policy-kwargs is not valid JSON ({e}); e.g. \'{{"mpcache": {{"topk": "rank"}}}}\''
        ) from None
    out = []
    baselines = [b.strip() for b in args.baseline_softmax.split(",") if b.strip()]
    if not baselines or set(baselines) - {"ours", "stock"}:
        raise SessionError(f"--baseline-softmax takes 'ours', 'stock' or 'ours,stock', got {args.baseline_softmax!r}")
    items = [i.strip() for i in args.policies.split(",")]
    if "stock" in baselines:  # the full cache with CrypTen's softmax, beside (or instead of) ours
        at = next((k for k, i in enumerate(items) if (i.partition("=")[2] or i) == "full"), None)
        if at is None:
            raise SessionError("--baseline-softmax stock needs the full policy in --policies (e.g. full,mpcache)")
        items[at : at + 1] = (["full"] if "ours" in baselines else []) + [f"{STOCK_LABEL}=full"]
    for item in items:
        label, _, name = item.strip().partition("=")
        name = name or label
        kw = dict(extra.get(label, {}))
        if name != "full":
            kw.setdefault("budget", int(args.budget) if args.budget > 1 else args.budget)
            # large candidate sets cannot afford the exact m^2 rank under MPC: the stratified tournament there
            kw.setdefault("topk", args.topk)
        try:
            if name != "full" and args.layer_budgets is not None:
                kw.setdefault("layer_budgets", parse_layer_budgets(args.layer_budgets))
            out.append((label, make_policy(name, **kw).bind(cfg)))
        except (ValueError, TypeError) as e:
            raise SessionError(f"bad policy {item!r} (kwargs {kw}): {e}") from None
    if len({lab for lab, _ in out}) != len(out):
        raise SessionError(f"--policies has duplicate labels: {args.policies!r} (use label=name)")
    return out


def _seq_lens(args, cfg):
    from mpcache.mpc.session import SessionError

    try:
        lens = [int(x) for x in args.seq_lens.split(",") if x.strip()]
    except ValueError:
        raise SessionError(f"--seq-lens must be comma-separated integers, got {args.seq_lens!r}") from None
    lo = args.warmup + args.steps + 8
    for n in lens:
        if not lo <= n <= cfg.max_position:
            raise SessionError(
                f"--seq-lens value {n} is outside [{lo}, {cfg.max_position}] (the model's context is "
                f"{cfg.max_position} tokens; at least warmup + steps + 8 rows are needed)"
            )
    return lens


def run(args) -> None:
    from mpi4py import MPI

    from mpcache.backends.secure import SecureBackend
    from mpcache.bench import (
        CSV_COLUMNS,
        agreement,
        attended,
        bench_layers_needed,
        markdown_table,
        plaintext_twin,
        prompt_ids,
        ratio_table,
        run_case,
        scale_costs,
        truncated,
    )
    from mpcache.generation import share_weights, write_json
    from mpcache.latency import PROFILES, modelled_seconds
    from mpcache.model.weights import load_model, load_public
    from mpcache.mpc.session import CLIENT, SERVER, SessionError, open_session_from_cli, serve_dealer

    if args.steps < 1 or args.warmup < 0:
        raise SessionError("--steps must be >= 1 and --warmup >= 0")
    rank = MPI.COMM_WORLD.Get_rank()
    try:
        if rank in (SERVER, CLIENT):  # the owner shares them; the client builds the plaintext prefix (convention)
            cfg, weights, tok = load_model(args.model, seed=args.seed)
        else:  # a third party or the dealer: the public part only
            (cfg, tok), weights = load_public(args.model, seed=args.seed), None
    except (ValueError, FileNotFoundError, OSError) as e:
        raise SessionError(f"cannot load --model {args.model!r}: {e}") from None
    if rank == SERVER:
        sys.stderr.write(f"[bench] {CONVENTION}\n")
    policies = _policies(args, cfg)
    lens = _seq_lens(args, cfg)
    if args.layers == "all":
        layers = cfg.n_layers
    elif args.layers == "auto":
        layers = max(bench_layers_needed(p, cfg.n_layers) for _, p in policies)
    else:
        try:
            layers = int(args.layers)
        except ValueError:
            raise SessionError(f"--layers must be 'auto', 'all' or an integer, got {args.layers!r}") from None
        need = max(bench_layers_needed(p, cfg.n_layers) for _, p in policies)
        if not need <= layers <= cfg.n_layers:
            raise SessionError(
                f"--layers {layers} must be in [{need}, {cfg.n_layers}] (every block class of the "
                "policies must be measured)"
            )
    public = {
        "job": "bench",
        "model": cfg.to_dict(),
        "seq_lens": lens,
        "layers": layers,
        "steps": args.steps,
        "warmup": args.warmup,
        "policies": [(lab, repr(p)) for lab, p in policies],
        "fixed_weights": args.fixed_weights,
        "check": args.check,
        "baseline_softmax": args.baseline_softmax,
    }
    sess = open_session_from_cli(args, public, fixed_weights=args.fixed_weights)
    os.makedirs(args.out, exist_ok=True)
    if sess.is_dealer:
        serve_dealer(sess)
        return
    B = SecureBackend(sess, fixed_weights=args.fixed_weights)
    B_stock = copy.copy(B)  # the full-stock cases: CrypTen's own softmax (--baseline-softmax stock)
    B_stock.cfg = dataclasses.replace(B.cfg, softmax_baseline="stock")
    cfg_k, w_k = truncated(cfg, weights if sess.rank == SERVER else None, layers)
    w_shared = share_weights(sess, B, cfg_k, w_k, fixed=args.fixed_weights)
    ids = prompt_ids(tok, max(lens), args.text, args.seed) if sess.rank == CLIENT else None
    plain_w = weights if sess.rank in (SERVER, CLIENT) else None  # client: the plaintext prefix (convention)

    bar = None
    if sess.rank == SERVER:
        from tqdm import tqdm

        bar = tqdm(
            total=len(lens) * len(policies),
            desc=f"bench ({sess.n_parties}PC, {args.protocol})",
            unit="case",
            file=sys.stderr,
            leave=False,
        )
    results = {}
    t_all = time.perf_counter()
    for n in lens:
        for label, pol in policies:
            if bar:
                bar.set_postfix_str(f"{label} @ {n}")
            results[(label, n)] = run_case(
                sess,
                B_stock if label == STOCK_LABEL else B,
                cfg,
                w_shared,
                plain_w if sess.rank == CLIENT else None,
                pol,
                label,
                n,
                ids,
                layers,
                args.warmup,
                args.steps,
                args.check,
            )
            if bar:
                bar.update(1)
    if bar:
        bar.close()
    sess.ledger.write(os.path.join(args.out, f"rank{sess.rank}.json"))

    # per party: whole-model per-token costs scaled from the measured blocks
    L = sess.ledger

    def totals(prefix):
        t = L.totals(prefix)
        return {"bytes": t["bytes_sent"], "rounds": t["rounds"], "seconds": L.time_of(prefix)}

    mine = {}
    for (label, n), res in results.items():
        base = f"bench/{label}/{n}"
        pol = dict(policies)[label]
        sc = scale_costs(totals, pol, cfg, layers, base, args.steps)
        st = totals(f"{base}/static")
        mine[(label, n)] = {
            "scaled": sc,
            "static": st,
            "static_seconds": res["static_seconds"],
            "sel": res.get("secure_sel"),
            "logits": [x.tolist() for x in res.get("secure_logits", [])],
        }
    gathered = sess.comm.gather(mine, root=SERVER)
    check_ids = sess.comm.bcast(ids if sess.rank == CLIENT else None, root=CLIENT) if args.check else None
    if sess.rank == SERVER:
        from mpcache.report import trust_model

        trust = trust_model(args.protocol, args.provider, sess.n_parties)["text"]
        rows = []
        for n in lens:
            for label, pol in policies:
                per = [g[(label, n)] for g in gathered]
                whole = {f: max(p["scaled"]["whole"][f] for p in per) for f in ("bytes", "rounds", "seconds")}
                lay = {
                    f: max(
                        sum(p["scaled"]["per_layer"][c][f] for c in p["scaled"]["per_layer"])
                        / len(p["scaled"]["per_layer"])
                        for p in per
                    )
                    for f in ("bytes", "rounds", "seconds")
                }
                head = {f: max(p["scaled"]["head"][f] for p in per) for f in ("bytes", "rounds")}
                att, frac = attended(pol, n, args.warmup, args.steps)
                row = {
                    "policy": label,
                    "seq_len": n,
                    "world_size": sess.n_parties,
                    "protocol": args.protocol,
                    "provider": args.provider,
                    "trust_model": trust,
                    "convention": CONVENTION,
                    "bytes_per_token": whole["bytes"],
                    "rounds_per_token": whole["rounds"],
                    "seconds_per_token": whole["seconds"],
                    "layer_bytes": lay["bytes"],
                    "layer_rounds": lay["rounds"],
                    "layer_seconds": lay["seconds"],
                    "head_bytes": head["bytes"],
                    "head_rounds": head["rounds"],
                    "static_bytes": max(p["static"]["bytes"] for p in per),
                    "static_rounds": max(p["static"]["rounds"] for p in per),
                    "static_seconds": max(p["static_seconds"] for p in per),
                    "attended": att,
                    "attended_frac": frac,
                    "bench_layers": layers,
                    "model_layers": cfg.n_layers,
                    "steps": args.steps,
                    "selection_agreement": "",
                    "logit_err": "",
                }
                for name, prof in PROFILES.items():
                    row[f"{name.lower()}_s"] = modelled_seconds(whole["seconds"], whole["rounds"], whole["bytes"], prof)
                if args.check:
                    twin = plaintext_twin(cfg, weights, pol, check_ids, n, layers, args.warmup, args.steps)
                    row["selection_agreement"] = agreement(per[0]["sel"], twin["sel"])
                    import torch

                    row["logit_err"] = max(
                        float((torch.tensor(a) - b).abs().max()) for a, b in zip(per[0]["logits"], twin["logits"])
                    )
                rows.append(row)
        _write(
            args.out,
            rows,
            {
                "args": vars(args),
                "wall_seconds": time.perf_counter() - t_all,
                "model": cfg.name,
                "convention": CONVENTION,
                "reveals": [list(r[:2]) for r in B.reveals],
            },
            markdown_table,
            ratio_table,
            (*CSV_COLUMNS, *(("convention",) if "convention" not in CSV_COLUMNS else ())),
            write_json,
        )
    sess.close()


def _write(out, rows, meta, markdown_table, ratio_table, columns, write_json):
    path = os.path.join(out, "bench.csv")
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)
    md = (
        "**Benchmark convention** (not an end-to-end private run): the client holds the plaintext weights and built "
        "the prompt's K/V cache in plaintext, secret-shared as its input; static eviction and decode steps ran on "
        "shares. Whole-model costs are scaled from "
        f"{rows[0]['bench_layers']} measured block(s) of {rows[0]['model_layers']}.\n\n"
        + markdown_table(rows)
        + "".join(
            f"\n\nRatios ({base} / policy){' (CrypTen stock softmax baseline)' if base == STOCK_LABEL else ''}:\n\n"
            + ratio_table(rows, base, skip=(STOCK_LABEL, "full"))
            for base in ("full", STOCK_LABEL)
            if any(r["policy"] == base for r in rows)
        )
        + "\n"
    )
    with open(os.path.join(out, "bench.md.tmp"), "w") as f:
        f.write(md)
    os.replace(os.path.join(out, "bench.md.tmp"), os.path.join(out, "bench.md"))
    write_json(os.path.join(out, "bench.json"), {"rows": rows, **meta})
    print(md, flush=True)
