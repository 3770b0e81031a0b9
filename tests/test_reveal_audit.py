"""The reveal audit (mpcache/mpc/audit.py) on real private generations: what every party receives, on every channel.

Four generations per trust model -- two prompts x two weight sets, same public shapes, fresh randomness each (forked
parties, real CrypTen; each runs the full cache and the MPCache policy, 2 new tokens) -- and one mpirun job of
``parties generate --no-plaintext`` for the MPI channel and the weight files. Checked: every ring value a party
receives inside the MPC is uniform over Z_2^64 (B2A's opened bits over {0, 1}); its distribution does not depend on
the prompt or the weights; the message sequence does not either; the only plaintext any party receives is the
generated tokens, at the client; the dealer receives public requests only, byte for byte the same in every run; only
the model owner reads the weights. Negative controls show each check fails on an unmasked value.

Significance: every statistical check of one test shares a family-wise 1e-3 (Bonferroni), so a correct protocol
fails a test with probability <= 1e-3 (the masks are fresh randomness: os.urandom seeds).
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

from mpcache.mpc import audit, session
from mpcache.mpc.local_parties import run_parties

FAMILY_ALPHA = 1e-3
PROMPT_LEN, NEW_TOKENS = 32, 2
POLICIES = ("full", "mpcache")  # mpcache: budget 0.3 of a 32-token prompt (selection, top-k and gathers run)


def _has_dealer_free() -> bool:
    return "none" in getattr(session, "PROVIDERS", {})


SETTINGS = [
    pytest.param((2, "arithmetic", "ttp"), id="2pc-dealer"),
    pytest.param(
        (3, "replicated", "none"),
        id="3pc-dealer-free",
        marks=pytest.mark.skipif(not _has_dealer_free(), reason="awaits the dealer-free 3PC provider 'none'"),
    ),
]


def _cat(lists) -> list:
    return [m for part in lists for m in part]


class _PublicLength:
    """The session's MPI communicator in forked parties (which have none): the prompt length is public."""

    def __init__(self, rank: int, n: int):
        self.rank, self.n = rank, n

    def Get_rank(self):
        return self.rank

    def bcast(self, obj, root=0):
        return self.n


def _prompts() -> list[list[int]]:
    """Two prompts of the same (public) length that differ at every position."""
    g = torch.Generator().manual_seed(7)
    a = torch.randint(0, 256, (PROMPT_LEN,), generator=g)
    b = (a + torch.randint(1, 256, (PROMPT_LEN,), generator=g)) % 256
    return [a.tolist(), b.tolist()]


def _generate_all(n, protocol, provider, weight_seed, ids, dealer_dir):
    """One forked session: the full cache, then MPCache, on one prompt and one weight set. Returns per policy the
    messages of every compute party, the client's tokens, and the dealer's messages (both policies)."""
    from mpcache.generation import private_generate
    from mpcache.model.weights import load_model
    from mpcache.policies import make_policy

    cfg, w, _ = load_model("tiny-llama", seed=weight_seed)
    policies = {"full": make_policy("full").bind(cfg), "mpcache": make_policy("mpcache", budget=0.3).bind(cfg)}

    def fn(sess):
        sess.comm = audit.wrap_mpi(_PublicLength(sess.rank, len(ids)))
        audit.take()  # the session's setup (crypten.init's seeds) is not part of a generation
        out = {}
        for name in POLICIES:
            toks, _, _ = private_generate(
                sess, cfg, w if sess.rank == 0 else None, ids if sess.rank == 1 else None, NEW_TOKENS, policies[name]
            )
            out[name] = (toks, audit.take())
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(session, "serve_dealer", audit.serve_dealer_audited(dealer_dir))
        res = run_parties(n, fn, protocol=protocol, provider=provider, timeout=600)
    out = {
        name: {"messages": _cat(r.value[name][1] for r in res), "tokens": res[1].value[name][0]} for name in POLICIES
    }
    dealer = os.path.join(dealer_dir, f"rank{n}.pt")
    out["dealer"] = audit.load(dealer)["messages"] if os.path.exists(dealer) else []
    return out


@pytest.fixture(scope="module", params=SETTINGS)
def four_runs(request, tmp_path_factory):
    """(n, protocol, provider) and four runs: (prompt 0, weights 0), (0, 1), (1, 0), (1, 1)."""
    n, protocol, provider = request.param
    prompts = _prompts()
    runs = []
    with audit.recording():
        for p in range(2):
            for ws in range(2):
                d = tmp_path_factory.mktemp(f"dealer-{provider}-{p}{ws}")
                runs.append(_generate_all(n, protocol, provider, ws, prompts[p], str(d)))
    return (n, protocol, provider), runs


def test_received_values_are_masked_and_independent_of_the_secrets(four_runs):
    """Every ring value received inside the MPC is uniform, in every run (public constants -- identical in all four
    runs -- set aside); per message, its distribution is the same for other prompts and other weights; the message
    sequence (place, op, scope, shape) is identical; the masks are fresh in every run."""
    (_, _, provider), runs = four_runs
    for name in POLICIES:
        msgs = [r[name]["messages"] for r in runs]
        assert sum(m.origin == "ring" for m in msgs[0]) > 100
        # CrypTen's own B2A (its 64-bit comparison, where a policy uses it) opens a bit per word (checked as bits); the
        # bit-sliced comparisons open packed words (64 masked bits: checked as ring); 3PC's B2A travels as shares
        if provider == "none":
            assert not any(m.origin == "bits" for m in msgs[0])
        reps = audit.check_runs(msgs, alpha=FAMILY_ALPHA / len(POLICIES))  # 4 x masked, 3 x two-sample
        assert len(reps) == 7, "\n".join(map(str, reps))
        for rep in reps:
            assert rep.ok and rep.tested_elements > 10_000, f"{name}: {rep}"
        # fresh masks: runs 0 and 1 share the prompt (the weights differ), yet no ring element is equal in both
        # unless it is a public constant (equal in all four runs): reused masks would repeat every opening of the
        # prompt alone (its one-hot rows, x - a)
        rings = [[m.values for m in run if m.origin == "ring"] for run in msgs]
        eq01 = torch.cat([a == b for a, b in zip(rings[0], rings[1])])
        everywhere = eq01 & torch.cat([a == b for a, b in zip(rings[0], rings[2])])
        everywhere &= torch.cat([a == b for a, b in zip(rings[0], rings[3])])
        assert int((eq01 & ~everywhere).sum()) <= 8, int((eq01 & ~everywhere).sum())


def test_the_only_plaintext_is_the_tokens_at_the_client(four_runs):
    _, runs = four_runs
    for r in runs:
        for name in POLICIES:
            msgs, tokens = r[name]["messages"], r[name]["tokens"]
            assert len(tokens) == NEW_TOKENS
            assert audit.check_reveals(msgs, tokens) == [], name
            # the public prompt length is the only thing on the session's (MPI) channel of a generation
            mpi = [m for m in msgs if m.channel == "mpi"]
            assert audit.check_mpi(mpi, {"public: prompt length"}) == []
            assert {m.load() for m in mpi} == {PROMPT_LEN}


def test_the_dealer_receives_only_public_requests(four_runs):
    (n, _, provider), runs = four_runs
    if provider != "ttp":  # dealer-free: no dealer rank, no dealer channel
        assert all(r["dealer"] == [] for r in runs)
        assert not any(m.channel == "dealer" or m.party >= n for r in runs for p in POLICIES for m in r[p]["messages"])
        return
    dealer = [r["dealer"] for r in runs]
    assert all(len(d) > 100 for d in dealer)
    assert audit.check_dealer(dealer, dealer=n) == []
    reqs = audit.dealer_requests(dealer[0], dealer=n)
    assert "terminate" in reqs or b"terminate" in reqs  # the session's end
    assert {q[0] for q in reqs if isinstance(q, tuple)} >= {"additive", "fixed_register"}  # (op, device, sizes...)


# ---- negative controls: each check flags an unmasked value ----------------------------------------------------------
def _msg(values, origin="ring", op="all_reduce", party=0, scope="x"):
    v = torch.as_tensor(values, dtype=torch.int64).reshape(-1)
    return audit.Message(party, "online", op, scope, origin, None, "torch.int64", tuple(v.shape), values=v)


def _uniform(n, seed):
    return torch.randint(-(2**63), 2**63 - 1, (n,), dtype=torch.int64, generator=torch.Generator().manual_seed(seed))


def test_checks_flag_unmasked_values():
    fixed_point = (torch.randn(500, generator=torch.Generator().manual_seed(1)) * 3 * 2**16).long()
    assert audit.check_masked([_msg(_uniform(4000, 2)), _msg(_uniform(3, 3))]).ok
    assert not audit.check_masked([_msg(_uniform(4000, 2)), _msg(fixed_point)]).ok  # an unmasked fixed-point tensor
    assert not audit.check_masked([_msg(fixed_point[:1])]).ok  # even a single unmasked element
    lanes = (fixed_point & 0xFFFFFFFF) | (_uniform(500, 4) << 32)  # a masked high lane, an unmasked low one
    assert not audit.check_masked([_msg(lanes)]).ok
    assert not audit.check_masked([_msg(_uniform(4000, 5) >> 8)]).ok  # a short mask: the top byte is biased
    bits = torch.randint(0, 2, (2000,), generator=torch.Generator().manual_seed(6))
    assert audit.check_masked([_msg(bits, origin="bits")]).ok
    assert not audit.check_masked([_msg(torch.zeros(2000), origin="bits")]).ok  # unmasked comparison bits
    assert not audit.check_masked([_msg(bits * 2, origin="bits")]).ok  # not a bit
    # two-sample: a masked opening against one whose distribution depends on the data
    a = [_msg(_uniform(4000, 7))]
    assert audit.check_independent(a, [_msg(_uniform(4000, 8))]).ok
    assert not audit.check_independent(a, [_msg(_uniform(4000, 8) >> 2)]).ok
    # structure: a secret-dependent shape
    assert audit.check_same_structure([[_msg(_uniform(8, 1))], [_msg(_uniform(9, 1))]]) != []
    # a public constant (identical in every run) is set aside, a varying unmasked value is not
    const = _msg(torch.arange(100))
    assert audit.check_masked([const], others=[[const]]).ok
    assert not audit.check_masked([_msg(fixed_point)], others=[[_msg(fixed_point + 1)]]).ok
    # plaintext: a token to the server, or anything but the tokens to the client
    tok = audit.Message(
        1, "online", "reduce", "token/0/reveal", "reveal", None, "torch.int64", (1,), torch.tensor([7]), scale=1
    )
    assert audit.check_reveals([tok], [7]) == []
    assert audit.check_reveals([tok], [8]) != []
    assert audit.check_reveals([tok, audit.Message(**{**tok.__dict__, "party": 0})], [7]) != []
    # the dealer: a request that changes with the secrets, or a tensor inside one
    req = audit.Message(2, "dealer", "recv_obj", "dealer", "object", 0, "tuple", (), obj=b"\x80\x04K\x01.")
    assert audit.check_dealer([[req], [req]], dealer=2) == []
    assert audit.check_dealer([[req], [audit.Message(**{**req.__dict__, "obj": b"\x80\x04K\x02."})]], dealer=2) != []
    import pickle

    leaky = audit.Message(**{**req.__dict__, "obj": pickle.dumps(("additive", "cpu", (torch.ones(2),), {}))})
    assert audit.check_dealer([[leaky]], dealer=2) != []


def _leaky_protocol(sess):
    """A correct Beaver product, then two faulty 'protocols': an opening without a mask, a plaintext to party 0."""
    import crypten
    import crypten.communicator as comm

    x = crypten.cryptensor(torch.randn(256, generator=torch.Generator().manual_seed(3)) * 4, src=1)
    (x * x).share  # noqa: B018 - one Beaver product: its openings are masked
    good = audit.take()
    comm.get().all_reduce(x.share.clone())  # opens x itself: unmasked
    unmasked = audit.take()
    x.get_plain_text(dst=0)  # a plaintext to the server
    to_server = audit.take()
    return good, unmasked, to_server


def test_live_leaks_are_flagged():
    """Real parties, real openings: the audit passes a Beaver product and flags an opening without a mask and a
    plaintext opened to the server."""
    with audit.recording():
        res = run_parties(2, _leaky_protocol, provider="tfp", timeout=120)
    good = _cat(r.value[0] for r in res)
    unmasked = _cat(r.value[1] for r in res)
    to_server = _cat(r.value[2] for r in res)
    assert good and audit.check_masked(good).ok
    rep = audit.check_masked(unmasked)
    assert not rep.ok and len(unmasked) == 2, str(rep)
    assert [m.party for m in to_server if m.origin == "reveal"] == [0]
    assert audit.check_reveals(to_server, []) != []


# ---- the MPI channel and the weight files: one mpirun job ---------------------------------------------------------
@pytest.mark.mpi
def test_private_run_over_mpi(tmp_path, monkeypatch):
    """``parties generate --no-plaintext`` (2PC + dealer) on a safetensors folder under MPCACHE_AUDIT: only rank 0
    reads the weights (the others open the folder's config.json, nothing else); the MPI channel carries the public
    prompt length and the cost reports only; the received values are masked; the plaintext is the tokens, at the
    client; the dealer gets public requests."""
    from conftest import run_mpi

    from mpcache.model.weights import load_model, save_safetensors_folder
    from parties.generate import PUBLIC_LABELS

    cfg, w, _ = load_model("tiny-llama", seed=4)
    model = save_safetensors_folder(cfg, w, tmp_path / "model")
    adir, out = tmp_path / "audit", tmp_path / "out"
    monkeypatch.setenv("MPCACHE_AUDIT", str(adir))
    args = ["-m", "parties", "generate", "--model", str(model), "--provider", "ttp", "--no-plaintext"]
    run_mpi(3, [*args, "--max-new-tokens", "2", "--prompt", "a secret prompt", "--out", str(out)], timeout=600)
    summary = json.loads((out / "summary.json").read_text())
    ranks = [audit.load(adir / f"rank{r}.pt") for r in range(3)]
    assert [r["role"] for r in ranks] == ["server (model owner)", "client (prompt owner)", "dealer"]
    # weights: read by the model owner alone; the others open only the public config
    assert ranks[0]["weight_reads"] == [str(model / "model.safetensors")]
    for r in ranks[1:]:
        assert r["weight_reads"] == [] and set(r["opened_files"]) <= {str((model / "config.json").resolve())}, r
    # MPI: public values only, each labelled
    compute = ranks[0]["messages"] + ranks[1]["messages"]
    mpi = [m for m in compute if m.channel == "mpi"]
    assert audit.check_mpi(mpi, set(PUBLIC_LABELS)) == []
    assert [(m.party, m.label, m.load()) for m in mpi if m.party == 0] == [
        (0, "public: prompt length", summary["prompt_tokens"])
    ]
    # inside the MPC: masked; plaintext: the tokens, to the client
    rep = audit.check_masked(compute, alpha=FAMILY_ALPHA / 2)
    assert rep.ok, str(rep)
    assert audit.check_reveals(compute, summary["tokens"]) == []
    assert ranks[1]["tokens"] == summary["tokens"] and summary["verify_mode"] is False
    dealer = ranks[2]["messages"]
    assert dealer and audit.check_dealer([dealer], dealer=2) == []


@pytest.mark.mpi
def test_verify_mode_is_a_labelled_step_after_the_private_run(tmp_path, monkeypatch):
    """In verify mode (the default) the client's prompt ids reach the model owner over MPI, labelled, after every
    message of the private run; nothing else carries them."""
    from conftest import run_mpi

    from parties.generate import PUBLIC_LABELS, VERIFY_LABELS

    adir, out = tmp_path / "audit", tmp_path / "out"
    monkeypatch.setenv("MPCACHE_AUDIT", str(adir))
    args = ["-m", "parties", "generate", "--model", "tiny-llama", "--max-new-tokens", "2", "--prompt", "secret"]
    args += ["--provider", "tfp"]
    run_mpi(2, [*args, "--out", str(out)], timeout=600)
    summary = json.loads((out / "summary.json").read_text())
    server = audit.load(adir / "rank0.pt")["messages"]
    assert audit.check_mpi(server, {*PUBLIC_LABELS, *VERIFY_LABELS}) == []
    verify = [i for i, m in enumerate(server) if m.label == VERIFY_LABELS[0]]
    assert len(verify) == 1 and len(server[verify[0]].load()) == summary["prompt_tokens"]
    assert all(m.channel == "mpi" for m in server[verify[0] :])  # after the private run's last message
    assert summary["verify_mode"] is True


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
