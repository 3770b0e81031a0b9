"""Latency model: T = T_compute + rounds x RTT + max-party bytes sent / bandwidth (design §6).

Profiles are data: LAN = 3 Gbps / 0.3 ms RTT and WAN = 400 Mbps / 40 ms RTT (the Cheetah/BumbleBee convention).
Users add their own with ``parse_profile("name=GBPS:RTT_MS")``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class NetworkProfile:
    name: str
    bandwidth_bps: float
    rtt_s: float


PROFILES = {
    "lan": NetworkProfile("lan", 3e9, 0.3e-3),
    "wan": NetworkProfile("wan", 400e6, 40e-3),
}


def parse_profile(spec: str) -> NetworkProfile:
    """``name=GBPS:RTT_MS``, e.g. ``edge=0.1:80``."""
    try:
        name, rest = spec.split("=")
        gbps, rtt_ms = rest.split(":")
        return NetworkProfile(name, float(gbps) * 1e9, float(rtt_ms) * 1e-3)
    except ValueError:
        raise ValueError(f"bad network profile {spec!r}: expected NAME=GBPS:RTT_MS, e.g. edge=0.1:80") from None


def modelled_seconds(compute_s: float, rounds: int, max_bytes_sent: int, prof: NetworkProfile) -> float:
    return compute_s + rounds * prof.rtt_s + 8.0 * max_bytes_sent / prof.bandwidth_bps
