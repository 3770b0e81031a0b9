"""Human-readable report of a private generation (the client prints it): every row and column named, the trust
model in words."""

from __future__ import annotations


def trust_model(protocol: str, provider: str, n_parties: int) -> dict:
    """The trust model of a configuration, in words (``text``) and as the one-line warning a run prints."""
    if provider == "none":
        text = (
            f"{n_parties}PC {protocol}, dealer-free: secure against one semi-honest party (honest majority); "
            "every tuple comes from the parties' pairwise seeds, no dealer"
        )
        return {"text": text, "warning": f"trust model: {text}\n"}
    if provider == "tfp":
        text = (
            f"{n_parties}PC {protocol}, TFP: party 0 (the model owner) makes every Beaver triple, so it can "
            "unmask what it receives, the client's prompt included -- a benchmark mode, secure against nobody"
        )
        return {
            "text": text,
            "warning": "WARNING: provider TFP: party 0 (the model owner) can read the client's "
            "input; a benchmark mode, not a private run.\n",
        }
    text = (
        f"{n_parties}PC {protocol} + a dealer rank (TTP) that sees no data: semi-honest, secure against one "
        "corrupt compute party while the dealer is honest and does not collude"
    )
    return {"text": text, "warning": f"trust model: {text}\n"}


def _mb(b) -> str:
    return f"{b / 1e6:,.2f}"


def _row_names(n_tokens: int, weights_reused: bool = False) -> list[tuple[str, str]]:
    offline = "share the prompt (weights reused)" if weights_reused else "share weights + prompt"
    return [("offline", offline), ("prefill", "prompt forward pass")] + [
        (f"token {t}", "argmax of the prefill's last position" if t == 0 else "decode step") for t in range(n_tokens)
    ]


def print_summary(s: dict) -> None:
    n = s["n_parties"]
    net = s.get("network") or {}
    print()
    print(
        f"== private generation: {s['model']} | {n}PC {s['protocol']} | policy {s['policy']} | prompt "
        f"{s['prompt_tokens']} tokens | device {s['device']}"
    )
    print(f"   trust model: {s['trust_model']}")
    if net:
        print(
            f"   network: rank 0 at {net['rank0_address']}:{net['port']} (via {net['iface']}), hosts "
            f"{', '.join(map(str, net['hosts']))}; openings over {net['openings']}"
        )
    plain = s.get("plaintext_step_seconds")
    hdr = [
        "row",
        "what",
        *[f"P{r} sent MB" for r in range(n)],
        *[f"P{r} recv MB" for r in range(n)],
        "rounds",
        "private s",
        *(["plaintext s"] if plain else []),
        "LAN s (model)",
        "WAN s (model)",
    ]
    phases = [s["offline"], s["prefill"], *s["per_token"]]
    rows = []
    for i, ((name, what), r) in enumerate(zip(_row_names(len(s["per_token"]), s.get("weights_reused", False)), phases)):
        pt = (
            []
            if not plain
            else [
                "" if i == 0 else f"{plain[0]:.3f}" if i == 1 else "(in prefill)" if i == 2 else f"{plain[i - 2]:.3f}"
            ]
        )
        rows.append(
            [
                name,
                what,
                *map(_mb, r["bytes_sent"]),
                *map(_mb, r["bytes_recv"]),
                str(r["rounds"]),
                f"{r['seconds']:.2f}",
                *pt,
                f"{r['modelled_lan_s']:.2f}",
                f"{r['modelled_wan_s']:.2f}",
            ]
        )
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(hdr)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    print(fmt(hdr))
    for r in rows:
        print(fmt(r))
    dec = s["per_token"][1:]
    if dec:
        avg = lambda k: sum(r[k] for r in dec) / len(dec)
        pt = f"; plaintext {sum(plain[1:]) / len(dec):.3f} s" if plain else ""
        print(
            f"decode mean over tokens 1..{len(dec)} ({len(dec)} decode steps; token 0 comes from the prefill): "
            f"{_mb(sum(max(r['bytes_sent']) for r in dec) / len(dec))} MB sent (max party), "
            f"{avg('rounds'):.0f} rounds, {avg('seconds'):.2f} s private{pt}, "
            f"{avg('modelled_lan_s'):.2f} s LAN / {avg('modelled_wan_s'):.2f} s WAN modelled"
        )
    if s.get("peak_rss_bytes"):
        print("peak memory (RSS): " + ", ".join(f"P{r} {b / 2**30:.2f} GiB" for r, b in enumerate(s["peak_rss_bytes"])))
    print(
        "columns: MB per party (sent / received); rounds = sequential exchanges (max over parties); private s = "
        "measured wall time; LAN/WAN s = measured compute + rounds x RTT + max-party bytes / bandwidth "
        "(mpcache/latency.py)"
    )
    print(f"private tokens : {s['tokens']}")
    print(f"private text   : {s['text']!r}")
    if "plaintext_tokens" in s:
        print(
            f"plaintext      : {s['plaintext_tokens']}  (verify mode: the client's prompt was sent to party 0 "
            "for this check)"
        )
        print(f"tokens agree   : {'YES' if s['tokens_agree'] else 'NO'}")
    else:
        print("plaintext      : not run (--no-plaintext: a private run; nothing left the client but masked shares)")
