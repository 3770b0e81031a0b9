"""Human-readable tables of a run's summary (rank 0 prints them)."""
from __future__ import annotations


def _mb(b) -> str:
    return f"{b / 1e6:,.2f}"


def print_summary(s: dict) -> None:
    n = s["n_parties"]
    print()
    print(f"== private generation: {s['model']} | {n}PC {s['protocol']} | provider {s['provider'].upper()}"
          f"{' (triples made by party 0: a benchmark convention, not secure against party 0)' if s['provider'] == 'tfp' else ' (dealer rank)'}"
          f" | policy {s['policy']} | prompt {s['prompt_tokens']} tokens | device {s['device']}")
    hdr = ["token", *[f"P{r} sent MB" for r in range(n)], *[f"P{r} recv MB" for r in range(n)], "rounds",
           "seconds", "LAN s (model)", "WAN s (model)"]
    rows = []
    for name in ("offline", "prefill"):
        r = s[name]
        rows.append([name, *map(_mb, r["bytes_sent"]), *map(_mb, r["bytes_recv"]), str(r["rounds"]),
                     f"{r['seconds']:.2f}", f"{r['modelled_lan_s']:.2f}", f"{r['modelled_wan_s']:.2f}"])
    for r in s["per_token"]:
        rows.append([str(r["token"]), *map(_mb, r["bytes_sent"]), *map(_mb, r["bytes_recv"]), str(r["rounds"]),
                     f"{r['seconds']:.2f}", f"{r['modelled_lan_s']:.2f}", f"{r['modelled_wan_s']:.2f}"])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(hdr)]
    print("  ".join(h.rjust(w) for h, w in zip(hdr, widths)))
    for r in rows:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))
    dec = s["per_token"][1:] or s["per_token"]
    avg = lambda k: sum(r[k] for r in dec) / len(dec)  # noqa: E731
    print(f"decode mean per token: {_mb(sum(max(r['bytes_sent']) for r in dec) / len(dec))} MB sent (max party), "
          f"{avg('rounds'):.0f} rounds, {avg('seconds'):.2f} s measured, "
          f"{avg('modelled_lan_s'):.2f} s LAN / {avg('modelled_wan_s'):.2f} s WAN modelled")
    print(f"private tokens : {s['tokens']}")
    print(f"private text   : {s['text']!r}")
    if "plaintext_tokens" in s:
        print(f"plaintext      : {s['plaintext_tokens']}  ({s['plaintext_seconds']:.2f} s)")
        print(f"tokens agree   : {'YES' if s['tokens_agree'] else 'NO'}")
