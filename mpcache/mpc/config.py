"""One frozen description of how the parties compute: every protocol knob, built once per session.

The session builds an :class:`MpcConfig` from the command line (``--protocol``, ``--provider``, ``--fixed-weights``,
``--fixed-kv`` and ``--mpc KEY=VALUE`` for any other field), hands it to the backend, which passes it explicitly to
every protocol; no protocol reads a module constant or a CrypTen global. Its fields go into the party handshake, so
two parties built with different knobs are refused at startup, naming the field (``mpc.<field>``). Ablations are
``dataclasses.replace(cfg, softmax_lean=False)``.

Every field is public (it shapes messages, never depends on data).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass


@dataclass(frozen=True)
class MpcConfig:
    # ---- who computes ------------------------------------------------------------------------------------------
    protocol: str = "arithmetic"  # "arithmetic" (additive, Beaver) or "replicated" (3PC)
    provider: str = "tfp"  # "tfp" (party 0 makes the triples: benchmark mode), "ttp" (a dealer rank) or "none" (3PC)
    n_parties: int = 2  # compute parties
    precision_bits: int = 16  # CrypTen's fixed-point fraction bits (more breaks its approximations)
    # ---- comparisons: 32-bit lanes (exact while the compared values stay far inside 2^15) --------------------------
    softmax_lean: bool = True  # the softmax's max tree: logits must satisfy |x| < 16384
    act_lanes: int = 16  # SiLU/GeLU breakpoints' comparison: 16-bit lanes (1/16 resolution, |x| < 2032), 32, 64
    norm_lean: bool = True  # the norms' range comparisons (fine sum < 2^12, coarse sum / 2^16)
    argmax_lean: bool = True  # the vocabulary argmax: |logit| < 16384
    select_lean: bool = True  # stratified top-k of the cache policies: |score| < 12288
    policy_lean: bool = True  # the cache policies' max/min/compare reductions
    # ---- tournament radices ("auto": the schedule minimising modelled latency on ``schedule_profile``) -------------
    softmax_radix: str | tuple = "auto"
    argmax_radix: str | tuple = "auto"
    strata_radix: str | int | tuple = "auto"
    schedule_profile: str = "lan"  # mpcache/latency.py profile whose latency the "auto" schedules minimise
    # ---- softmax -------------------------------------------------------------------------------------------------
    softmax_baseline: str = "ours"  # "stock": CrypTen's own MPCTensor.softmax everywhere (a cost BASELINE only)
    softmax_recip: str = "goldschmidt"  # or "newton"
    softmax_exp_fit: float | None = None  # None: exp base 1 + x/2^iters; 8.0: the minimax base on [-8, 0]
    exp_iters: int = 8  # squarings of the limit exp (row-max softmax)
    anchor_exp_iters: int = 7  # squarings of the anchored softmax's exp: (1 + t + t^2/2)^128, t = y/128
    anchor_exp_order: int = 2  # its base's order (1: (1 + y/1024)^1024 at anchor_exp_iters = 10, session 9's)
    anchor_recip: tuple = (-8, 30, 4)  # the anchored reciprocal's range 2^lo..2^(hi+1) and steps per octave
    # its Goldschmidt steps: 4 steps per octave start within 0.087 of 1/x, so 2 steps reach 5.7e-5 (session 9's
    # (q, iters) = (2, 3): 0.172 -> 7.5e-7, one more round per softmax for ~1 MB per demo token less)
    anchor_recip_iters: int = 2
    anchor_guard: float | None = 10.0  # the anchored exp's argument clamped at this excess (None: unguarded)
    # ---- activations ----------------------------------------------------------------------------------------------
    # open-once masks (mpcache/mpc/masked.py: every value opened once, products local, comparison bits as bit slots;
    # 2PC with TFP or the dealer) for SiLU/GeLU (a gated SiLU: 5 rounds and ~102 B where the Beaver forms take 6 and
    # ~167 B), the norms' branch select and the reciprocal's d0 (one round less each)
    masked_acts: bool = True
    # ---- norms ---------------------------------------------------------------------------------------------------
    norm_range: tuple = (-10, 30)  # sum of squares (+ D eps) in [2^lo, 2^(hi+1))
    norm_steps: int = 5  # thresholds per octave of the rsqrt's step guess (mpc/norms.py: 8.5e-5 relative)
    norm_degree: int = 2  # degree of the polynomial for z^-1/2 (z = s Y^2 near 1): degree - 1 rounds
    # ---- routes and transport --------------------------------------------------------------------------------------
    gather_triples: bool = True  # attention over a strata selection by three-operand products (TFP, 2PC, CPU)
    one_exchange: bool = True  # an opening's all-reduce as one exchange (send to every peer, receive theirs)
    lockstep: bool = True  # independent protocols' openings merged round by round (mpcache/mpc/lockstep.py)
    # decode with no per-step selection: the anchored softmax's offset made beside the norm, the new K/V row fixed
    # beside the logits (Transformer._decode_offset / _fix_and_score); only where lockstep merges (2PC)
    early_offset: bool = True
    mpi_exchange: str | bool = "auto"  # openings over MPI point-to-point ("auto": one host, a core per party)
    lean_tfp: bool = True  # TFP tuples with one draw per peer share (same distribution, same trust model)
    fixed_weights: bool = True  # fixed-operand triples for the weight matrices (W - B opened once, offline)
    fixed_kv: bool = True  # ... and for the cached K/V rows (opened once, when written)
    fold_norms: bool = True  # block norm gains folded into the next linear layers before sharing

    def __post_init__(self):
        if self.protocol not in ("arithmetic", "replicated"):
            raise ValueError(f"MpcConfig.protocol must be 'arithmetic' or 'replicated', got {self.protocol!r}")
        if self.provider not in ("tfp", "ttp", "none"):
            raise ValueError(f"MpcConfig.provider must be 'tfp', 'ttp' or 'none', got {self.provider!r}")
        if self.provider == "none" and self.protocol != "replicated":
            raise ValueError("MpcConfig.provider 'none' (dealer-free) needs protocol 'replicated' (3 parties)")
        if self.softmax_baseline not in ("ours", "stock"):
            raise ValueError(f"MpcConfig.softmax_baseline must be 'ours' or 'stock', got {self.softmax_baseline!r}")
        if self.softmax_recip not in ("goldschmidt", "newton"):
            raise ValueError(f"MpcConfig.softmax_recip must be 'goldschmidt' or 'newton', got {self.softmax_recip!r}")

    @property
    def setting(self):
        """The schedule search's view: (parties, protocol, provider)."""
        from .schedules import Setting

        return Setting(self.n_parties, self.protocol, self.provider)

    def public(self) -> dict:
        """Every field, JSON-ready (tuples as lists): what the handshake compares, field by field."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.public(), sort_keys=True).encode()).hexdigest()[:16]

    @classmethod
    def parse(cls, items: list[str] | None, **base) -> MpcConfig:
        """``MpcConfig(**base)`` with ``KEY=VALUE`` overrides (``--mpc softmax_lean=false --mpc exp_iters=10``);
        values are JSON (``true``, ``8``, ``[4, 8]``, ``"auto"``) or a bare word (``auto``). Unknown keys and values
        of the wrong kind are refused, naming the field."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        out = dict(base)
        for item in items or []:
            key, sep, raw = item.partition("=")
            key = key.strip()
            if not sep or key not in fields:
                raise ValueError(f"--mpc {item!r}: use KEY=VALUE with KEY one of {', '.join(sorted(fields))}")
            try:
                value = json.loads(raw)
            except json.JSONDecodeError:
                value = raw
            if isinstance(value, list):
                value = tuple(value)
            default = fields[key].default
            if isinstance(default, bool) and not isinstance(value, bool) and key != "mpi_exchange":
                raise ValueError(f"--mpc {key}={raw}: {key} takes true or false")
            out[key] = value
        return cls(**out)

    @classmethod
    def current(cls, **overrides) -> MpcConfig:
        """The defaults for the running CrypTen session's parties/protocol/provider: for calling a protocol directly
        (tests, experiments) outside a backend, which always passes its session's config."""
        import crypten
        import crypten.communicator as comm

        provider = {"TTP": "ttp", "R3": "none"}.get(crypten.mpc.get_default_provider().NAME, "tfp")
        protocol = "replicated" if crypten.cfg.mpc.protocol == "replicated" else "arithmetic"
        return cls(protocol=protocol, provider=provider, n_parties=comm.get().get_world_size(), **overrides)


DEFAULT = MpcConfig()

__all__ = ["DEFAULT", "MpcConfig"]
