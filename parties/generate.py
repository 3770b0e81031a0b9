"""The ``generate`` job: load, handshake, share, generate privately, write per-rank JSON; rank 0 summarises."""
from __future__ import annotations

import os
import sys
import time

DEFAULT_PROMPT = "What is the capital of France? Answer in one sentence."


def _read_prompt(args) -> str:
    if args.prompt_file:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                return f.read()
        except OSError as e:
            from mpcache.mpc.session import SessionError

            raise SessionError(f"cannot read --prompt-file {args.prompt_file!r}: {e.strerror}") from None
    return args.prompt if args.prompt is not None else DEFAULT_PROMPT


def run(args) -> None:
    from mpi4py import MPI

    from mpcache.generation import (per_token_costs, plaintext_generate, private_generate, write_json)
    from mpcache.model.weights import expected_shapes, load_model
    from mpcache.mpc.session import CLIENT, SERVER, SessionError, open_session, serve_dealer
    from mpcache.policies import make_policy
    from mpcache.report import print_summary

    rank = MPI.COMM_WORLD.Get_rank()
    if args.max_new_tokens < 1:
        raise SessionError("--max-new-tokens must be >= 1")
    try:
        cfg, weights, tok = load_model(args.model, seed=args.seed)
    except (ValueError, FileNotFoundError, OSError) as e:
        raise SessionError(f"cannot load --model {args.model!r}: {e}") from None
    # --budget <= 1 is a fraction of the prompt, > 1 a token count
    policy_kwargs = {} if args.budget is None else {"budget": int(args.budget) if args.budget > 1 else args.budget}
    try:
        policy = make_policy(args.policy, **policy_kwargs)
    except (ValueError, TypeError) as e:
        raise SessionError(f"bad --policy/--budget: {e}") from None
    public = {"model": cfg.to_dict(), "weight_shapes": {k: list(v) for k, v in expected_shapes(cfg).items()},
              "policy": repr(policy), "max_new_tokens": args.max_new_tokens, "device": args.device,
              "fixed_weights": args.fixed_weights, "fixed_kv": args.fixed_kv}
    sess = open_session(args.protocol, args.provider, args.device, public, timeout_s=args.timeout)
    os.makedirs(args.out, exist_ok=True)
    if sess.is_dealer:
        serve_dealer(sess)
        return
    if sess.rank != SERVER:
        weights = None                                   # only the server holds (and shares) the weights
    ids = None
    if sess.rank == CLIENT:
        text = _read_prompt(args)
        if args.chat and tok.chat_format == "chatml" and tok.chat_template:
            text = tok.apply_chat_template(text)
        ids = tok.encode(text)
        if not ids:
            raise SessionError("the prompt is empty after tokenization; give a non-empty --prompt")

    bar = None
    if sess.rank == SERVER:
        from tqdm import tqdm

        bar = tqdm(total=args.max_new_tokens, desc=f"private generation ({sess.n_parties}PC, {args.protocol})",
                   unit="tok", file=sys.stderr, leave=False)
    t0 = time.perf_counter()
    tokens, _, B = private_generate(sess, cfg, weights, ids, args.max_new_tokens, policy,
                                    progress=(lambda t: bar.update(1)) if bar else None,
                                    fixed_weights=args.fixed_weights, fixed_kv=args.fixed_kv)
    wall = time.perf_counter() - t0
    if bar:
        bar.close()
    sess.ledger.write(os.path.join(args.out, f"rank{sess.rank}.json"))
    ledgers = sess.comm.gather(sess.ledger.to_dict(), root=SERVER)
    # the client reveals its output to the operator's report (its choice in this demo), nothing else leaves it
    client_out = sess.comm.bcast({"tokens": tokens, "prompt_ids": ids} if sess.rank == CLIENT else None, root=CLIENT)
    if sess.rank == SERVER:
        per_token, phases = per_token_costs(ledgers, args.max_new_tokens)
        summary = {
            "world_size": sess.world_size, "n_parties": sess.n_parties, "protocol": args.protocol,
            "provider": args.provider, "device": args.device, "model": cfg.name, "policy": repr(policy),
            "prompt_tokens": len(client_out["prompt_ids"]), "tokens": client_out["tokens"],
            "text": tok.decode(client_out["tokens"]), "per_token": per_token, **phases,
            "wall_seconds": wall, "reveals": [list(r[:2]) for r in B.reveals],
            "fixed_weights": args.fixed_weights, "fixed_kv": args.fixed_kv, "matmul_paths": dict(B.matmul_paths),
        }
        if not args.no_plaintext:
            pt, _, pt_s = plaintext_generate(cfg, load_model(args.model, seed=args.seed)[1],
                                             client_out["prompt_ids"], args.max_new_tokens, policy)
            summary.update(plaintext_tokens=pt, plaintext_text=tok.decode(pt), plaintext_seconds=pt_s,
                           tokens_agree=pt == client_out["tokens"])
        write_json(os.path.join(args.out, "summary.json"), summary)
        print_summary(summary)
    if sess.rank == CLIENT:
        print(f"[client] generated: {tok.decode(tokens)!r}", flush=True)
    sess.close()
