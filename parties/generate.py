"""The ``generate`` job: check the inputs, handshake, share, generate privately, write per-rank JSON; the client
(rank 1, the only party that learns the output) prints the report and writes ``summary.json``.

Verify mode (the default; ``--no-plaintext`` turns it off): after the private run the client sends its prompt
ids to the model owner (rank 0), which runs the same generation in the clear and returns its tokens and times.
It needs both secrets by design, so it is a labelled verification step outside the private data flow: every
report says whether it ran.

Who reads what: only the model owner (rank 0) reads the weights (``load_model``); every other rank -- the client,
a third party, the dealer -- loads the public part alone (``load_public``: the config and tokenizer, no weight),
gets the shapes from the config and its weight shares from the sharing itself.

``MPCACHE_AUDIT=DIR`` (the reveal audit, :mod:`mpcache.mpc.audit`): every rank records what it receives on every
channel (CrypTen's openings and transfers, the dealer's requests, the session's MPI messages, each labelled), the
weight sources it read and the files it opened under the model's folder, and writes them to ``DIR/rank{r}.pt``.
"""

from __future__ import annotations

import os
import resource
import sys
import time

DEFAULT_PROMPT = "What is the capital of France? Answer in one sentence."
AUDIT_ENV = "MPCACHE_AUDIT"  # a folder: record and write what every rank receives (mpcache/mpc/audit.py)
#: the labels of every MPI message of a run (the audit checks that nothing else crosses MPI)
PUBLIC_LABELS = ("public: prompt length", "public: cost ledgers", "public: peak memory", "public: number of prompts")
VERIFY_LABELS = ("verify: the client's prompt ids to the model owner", "verify: plaintext tokens to the client")


def _read_prompt(args) -> str:
    if args.prompt_file:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                return f.read()
        except OSError as e:
            from mpcache.mpc.session import SessionError

            raise SessionError(f"cannot read --prompt-file {args.prompt_file!r}: {e.strerror}") from None
    return args.prompt if args.prompt is not None else DEFAULT_PROMPT


def _read_prompts(args) -> list[str]:
    """The client's prompts: ``--prompts FILE`` (one per non-blank line), else the one of ``--prompt``/``--prompt-file``."""
    if not args.prompts:
        return [_read_prompt(args)]
    from mpcache.mpc.session import SessionError

    try:
        with open(args.prompts, encoding="utf-8") as f:
            texts = [line.rstrip("\n") for line in f if line.strip()]
    except OSError as e:
        raise SessionError(f"cannot read --prompts {args.prompts!r}: {e.strerror}") from None
    if not texts:
        raise SessionError(f"--prompts {args.prompts!r} holds no prompt: write one prompt per line")
    return texts


def _policy(args, cfg):
    """The cache policy from ``--policy``/``--budget``, refused with the fix named on any bad combination."""
    from mpcache.mpc.session import SessionError
    from mpcache.policies import make_policy
    from mpcache.policies.squeeze import parse_layer_budgets

    kwargs = {}
    if args.budget is not None:
        b = args.budget
        if args.policy == "full":
            raise SessionError(
                f"--budget {b:g}: the full cache attends every row and takes no budget; drop "
                "--budget, or pick a policy that evicts (e.g. --policy mpcache --budget 0.1)."
            )
        if b > 1 and b != int(b):
            raise SessionError(
                f"--budget {b:g}: a budget above 1 is a token count and must be a whole number "
                "(e.g. --budget 64); a fraction of the prompt lies in (0, 1] (e.g. --budget 0.1)."
            )
        kwargs["budget"] = int(b) if b > 1 else b
    try:
        if args.layer_budgets is not None:
            kwargs["layer_budgets"] = parse_layer_budgets(args.layer_budgets)
        return make_policy(args.policy, **kwargs).bind(cfg)  # e.g. --layer-budgets calibrated: read, checked
    except (ValueError, TypeError) as e:
        raise SessionError(f"bad --policy/--budget: {e}") from None


def _launch_check(args) -> None:
    """Refuse a launch that cannot work before any party does any work."""
    from mpi4py import MPI

    from mpcache.mpc.session import SessionError

    if args.max_new_tokens < 1:
        raise SessionError("--max-new-tokens must be >= 1")
    size = MPI.COMM_WORLD.Get_size()
    compute = size - (args.provider == "ttp")
    if args.protocol == "arithmetic" and compute == 3:
        raise SessionError(
            "3 compute parties with --protocol arithmetic are not supported: launch 3 parties with "
            "--protocol replicated (3PC), or 2 parties (`mpirun -n 2`), or 2 parties + a dealer "
            "(`mpirun -n 3 ... --provider ttp`)."
        )


def _peak_rss() -> int:
    """This process's peak resident memory in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _model_root(spec: str):
    """The GGUF file or HF folder a model spec reads (the audit watches opens under it); None for the tiny configs
    or a spec that does not resolve (the load then explains)."""
    from mpcache.model.weights import model_source

    try:
        return model_source(spec)
    except (ValueError, FileNotFoundError, TypeError):
        return None


def _load(args, rank: int):
    """(config, weights or None, tokenizer): only the model owner (rank 0) reads the weights; every other rank loads
    the public part (config + tokenizer, no weight) and gets its weight shares from the sharing."""
    from mpcache.model.weights import load_model, load_public
    from mpcache.mpc.session import SERVER, SessionError

    try:
        if rank == SERVER:
            return load_model(args.model, seed=args.seed)
        cfg, tok = load_public(args.model, seed=args.seed)
        return cfg, None, tok
    except (ValueError, FileNotFoundError, OSError) as e:
        raise SessionError(f"cannot load --model {args.model!r}: {e}") from None


def run(args) -> None:
    from mpi4py import MPI

    from mpcache.generation import per_token_costs, plaintext_generate, private_generate, write_json
    from mpcache.model.weights import expected_shapes, load_model
    from mpcache.mpc import audit
    from mpcache.mpc.session import CLIENT, SERVER, SessionError, open_session_from_cli, serve_dealer
    from mpcache.report import print_summary, trust_model

    rank = MPI.COMM_WORLD.Get_rank()
    audit_dir = os.environ.get(AUDIT_ENV) or None
    if audit_dir:  # before anything is read or received
        audit.enable()
        root = _model_root(args.model)
        if root is not None:
            audit.watch_files(root)
    _launch_check(args)
    cfg, weights, tok = _load(args, rank)
    policy = _policy(args, cfg)
    prompts = None
    if rank == CLIENT:  # the client checks every prompt before anyone shares anything
        prompts = []
        texts = _read_prompts(args)
        for i, text in enumerate(texts):
            which = f"prompt {i + 1} of --prompts" if args.prompts else "the prompt"
            if args.chat and tok.chat_format == "chatml" and tok.chat_template:
                text = tok.apply_chat_template(text)
            ids = tok.encode(text)
            if not ids:
                raise SessionError(f"{which} is empty after tokenization; give a non-empty prompt")
            if len(ids) + args.max_new_tokens > cfg.max_position:
                raise SessionError(
                    f"{which} has {len(ids)} tokens and --max-new-tokens is {args.max_new_tokens}: "
                    f"{len(ids) + args.max_new_tokens} positions, but the model's context is "
                    f"{cfg.max_position}; shorten the prompt or ask for fewer new tokens."
                )
            prompts.append(ids)
    public = {
        "model": cfg.to_dict(),
        "weight_shapes": {k: list(v) for k, v in expected_shapes(cfg).items()},
        "tokenizer": _digest(tok.to_json()),
        "policy": repr(policy),
        "max_new_tokens": args.max_new_tokens,
        "device": args.device,
        "fixed_weights": args.fixed_weights,
        "fixed_kv": args.fixed_kv,
        "verify": not args.no_plaintext,
        "prompts": bool(args.prompts),  # several prompts, one session (each party loops; their number is sent)
    }
    if audit_dir and rank >= MPI.COMM_WORLD.Get_size() - (args.provider == "ttp"):
        audit.watch_dealer()  # the dealer's communicator is made inside its serve loop
    sess = open_session_from_cli(args, public, fixed_weights=args.fixed_weights, fixed_kv=args.fixed_kv)
    if sess.is_dealer:
        serve_dealer(sess)
        if audit_dir:
            audit.dump(audit_dir, sess.rank, role="dealer")
        return
    sess.comm = audit.wrap_mpi(sess.comm)  # recorded when the audit is on (else unchanged)

    def one(i: int, ids, out_dir: str, shared: dict):
        bar, phase_t = None, [time.perf_counter()]
        if sess.rank == CLIENT:
            sys.stderr.write(f"[client] {trust_model(args.protocol, args.provider, sess.n_parties)['warning']}")
            what = f"weights ({cfg.name}) and the prompt" if i == 0 else "the prompt (the weights' shares reused)"
            sys.stderr.write(f"[client] offline: sharing {what} ({len(ids)} tokens) ...\n")

        def on_phase(name):
            now = time.perf_counter()
            if sess.rank == CLIENT:
                sys.stderr.write(
                    f"[client] offline done in {now - phase_t[0]:.1f} s; prefill over {len(ids)} prompt "
                    f"tokens ({cfg.n_layers} layers) ...\n"
                )
            phase_t[0] = now

        def on_token(t):
            nonlocal bar
            if sess.rank != CLIENT:
                return
            if t == 0:
                sys.stderr.write(
                    f"[client] prefill done in {time.perf_counter() - phase_t[0]:.1f} s (token 0 is the "
                    "argmax of its last position)\n"
                )
                if args.max_new_tokens > 1:
                    from tqdm import tqdm

                    bar = tqdm(total=args.max_new_tokens - 1, desc="decode", unit="tok", file=sys.stderr, leave=False)
            elif bar is not None:
                bar.update(1)

        t0 = time.perf_counter()
        tokens, _, B = private_generate(
            sess,
            cfg,
            weights,
            ids,
            args.max_new_tokens,
            policy,
            progress=on_token,
            fixed_weights=args.fixed_weights,
            fixed_kv=args.fixed_kv,
            on_phase=on_phase,
            shared=shared,
        )
        wall = time.perf_counter() - t0
        if bar is not None:
            bar.close()

        # verify mode: the client's prompt goes to the model owner, in the clear, for the plaintext check
        check = None
        if not args.no_plaintext:
            if sess.rank == CLIENT:
                sess.comm.send(ids, dest=SERVER, tag=11)
                with audit.label(VERIFY_LABELS[1]):
                    check = sess.comm.recv(source=SERVER, tag=12)
            elif sess.rank == SERVER:
                with audit.label(VERIFY_LABELS[0]):
                    prompt = sess.comm.recv(source=CLIENT, tag=11)
                pt, _, pt_s = plaintext_generate(
                    cfg, load_model(args.model, seed=args.seed)[1], prompt, args.max_new_tokens, policy
                )
                sess.comm.send({"tokens": pt, "step_seconds": pt_s}, dest=CLIENT, tag=12)
        # ledgers (public costs) and peak memory go to the client, who reports
        with audit.label(PUBLIC_LABELS[1]):
            ledgers = sess.comm.gather(sess.ledger.to_dict(), root=CLIENT)
        with audit.label(PUBLIC_LABELS[2]):
            peaks = sess.comm.gather(_peak_rss(), root=CLIENT)
        os.makedirs(out_dir, exist_ok=True)
        sess.ledger.write(os.path.join(out_dir, f"rank{sess.rank}.json"))
        if sess.rank == CLIENT:
            per_token, phases = per_token_costs(ledgers, args.max_new_tokens)
            summary = {
                "world_size": sess.world_size,
                "n_parties": sess.n_parties,
                "protocol": args.protocol,
                "provider": args.provider,
                "trust_model": trust_model(args.protocol, args.provider, sess.n_parties)["text"],
                "device": args.device,
                "model": cfg.name,
                "policy": str(policy),
                "policy_repr": repr(policy),
                "network": sess.network,
                "prompt_tokens": len(ids),
                "tokens": tokens,
                "text": tok.decode(tokens),
                "per_token": per_token,
                **phases,
                "wall_seconds": wall,
                "peak_rss_bytes": peaks,
                "reveals": [list(r[:2]) for r in B.reveals],
                "fixed_weights": args.fixed_weights,
                "fixed_kv": args.fixed_kv,
                "matmul_paths": dict(B.matmul_paths),
                "verify_mode": check is not None,
            }
            if check is not None:
                summary.update(
                    plaintext_tokens=check["tokens"],
                    plaintext_text=tok.decode(check["tokens"]),
                    plaintext_seconds=sum(check["step_seconds"]),
                    plaintext_step_seconds=check["step_seconds"],
                    tokens_agree=check["tokens"] == tokens,
                )
            if args.prompts:
                summary.update(prompt_index=i, weights_reused=i > 0)
            write_json(os.path.join(out_dir, "summary.json"), summary)
            print_summary(summary)
            if getattr(args, "profile", False):
                _print_profile(ledgers, sess.n_parties)
        return tokens, ids

    n_prompts = 1
    if args.prompts:  # the number of prompts is public, as each prompt's length
        with audit.label(PUBLIC_LABELS[3]):
            n_prompts = sess.comm.bcast(len(prompts) if sess.rank == CLIENT else None, root=CLIENT)
    shared: dict = {}
    for i in range(n_prompts):
        if i > 0:
            sess.ledger.clear()  # each prompt's report and ledger count that prompt alone
        out_dir = os.path.join(args.out, f"prompt{i}") if args.prompts else args.out
        tokens, ids = one(i, prompts[i] if sess.rank == CLIENT else None, out_dir, shared)
    sess.close()
    if audit_dir:
        audit.dump(
            audit_dir,
            sess.rank,
            role=sess.role,
            tokens=tokens,
            verify=not args.no_plaintext,
            prompt_tokens=len(ids) if ids is not None else None,
        )


def _digest(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _print_profile(ledgers, n_parties: int) -> None:
    """--profile: per party, where a decode token's wall time goes per op (summed over layers, mean over the
    decode tokens): local compute, waiting for the peer, serialisation/copies of the exchanges (mpcache/mpc/ledger.py)."""
    from mpcache.mpc.ledger import decode_profile, format_profile

    for r, led in enumerate(ledgers[:n_parties]):
        rows = decode_profile(led)
        if rows:
            print(f"\nper-round profile, party {r}: one decode token (mean over tokens 1..), ops summed over layers")
            print(format_profile(rows))
