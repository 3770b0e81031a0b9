"""Three-operand fixed-mask products: attention over a secret one-hot selection of a fixed K/V cache, opening only
the query, the one-hot and the selected probabilities.

MPCache's attention over its selection (``mpcache.model.attention.attend_selected``) needs, per KV head, the scores of the
selected blocks ``S = q · (O ⊙ K)ᵀ`` and the output ``o = p · (O ⊙ V)``, where ``O`` is the stratified selection's
compact one-hot (``k`` rows, one of ``g`` slots each; row r's slot j is candidate block ``idx[r, j]``) and K, V are
fixed operands (``D = W - B`` opened once, :mod:`mpcache.mpc.fixed_operand`). Done as two two-operand products
(the one-hot times the masked scores of every candidate row, then the probabilities scattered back and multiplied
by every row of V), each product opens its moving operand: ``G·L`` scores and ``G·L`` probabilities per KV head
(8 bytes each per party), 3 rounds. Here each product of three operands is ONE opening of its fresh operands:

    q = e + a,  O = E + A,  K = D + B       (e = q - a and E = O - A opened; D public since K was fixed)
    S = e·E·[K] + e·[A]·D + e·[A⊙B] + [a]·E·D + E·[a⊗B] + [a·A·D] + [a·A·B]

(contractions as in ``S[γ, r, i] = Σ_{j,d} q[γ,d] O[r,j] K[r,j,i,d]``; ``[x]`` = this party's share; the
bracketed mask products come from the dealer, the rest is local), and the same for ``o`` with ``p = e' + a'``,
the SAME ``E, A`` (O is one value, masked once) and V's ``D, B``. Then the usual local truncation (2PC).

* **rounds**: 1 for the scores (``E`` and ``e`` in one opening), 1 for the output (``e'``, together with the
  products of the always-attended rows, :func:`fixed_matmul`'s opening). The two-operand route took 3.
* **bytes/party** (2PC): ``8·(|O| + |q|)`` and ``8·|p_sel|`` — the one-hot (``k·g`` ≈ the candidate clusters)
  and the query/probabilities of the attended rows only, instead of ``8·G·L`` twice.
* **dealer** terms, fresh per use: ``[a]``, ``[A]``, ``[A⊙B]`` (``k·blk·d``), ``[a⊗B]`` (``G·k·g·blk`` for K,
  ``G·k·g·d`` for V) and ``[a·A·B]`` (output-sized); and the term with ``D``, ``[a·A·D]``, realised per provider:

  - **TFP** (2 parties, party 0 makes every mask: no traffic): party 0 computes ``a·A·D`` itself and shares
    ``a·A·(D + B)``.
  - **TTP** (the pipelined dealer, :mod:`mpcache.mpc.dealer`): the dealer knows ``B``, so it must never see ``D``
    (``D + B = W``). It supplies only D-free terms: ``[a⊗A]``, the shares of the outer product of the two masks
    (``G·d·k·g`` for the scores, ``G·k·blk·g`` for the output: one entry per (query, contracted index of D)), and
    every party contracts its share with the public ``D`` locally: ``Σ [a⊗A]·D = [a·A·D]``. Its other terms come
    from its own ``B`` (the fixed operand's view recipe, ``spec``/:func:`eval_spec`), ``a`` and ``A`` from the
    seeds it shares with the parties (``A`` registered once per one-hot, dropped after the output's request).
    Party 0 posts one request per product (public: keys, view recipe with the public candidate indices, sizes)
    and receives all its terms as one answer, off the critical path (taken after the product's opening);
    party 1 draws its terms from its seed. **Dealer bytes** (party 0 receives, 8 per element):
    ``k·blk·d + G·k·g·blk + G·d·k·g + G·k·blk`` for the scores, ``k·blk·dv + G·k·g·dv + G·k·blk·g + G·dv`` for
    the output, per KV head; sent: the pickled requests (a few hundred bytes). **Online: the same openings,
    bytes and rounds as TFP.**

Security (semi-honest). ``e = q - a``, ``E = O - A`` and ``e' = p - a'`` are one-time pads: ``a``, ``A``, ``a'``
are fresh, uniform and mask one value each (``A`` masks the one-hot in both products: the same value with the same
pad, opened once). ``D`` is K's (V's) earlier opening, public already to the compute parties. Every dealer term is
a fresh additive sharing (TFP: pseudo-random zero sharing by party 0; TTP: seeded shares for party 1, party 0's
share from the dealer). So a compute party's view is the uniform openings plus its uniform shares, simulatable from
the shapes alone. The TTP dealer sees the request stream only (sizes, keys, view recipes: public), never ``D``,
an opening or a share. **Leakage: shapes only** (the number of candidates, rows, slots: public functions of the
budget). TFP: party 0 knows every mask (the TFP convention: a benchmark mode).
"""

from __future__ import annotations

import torch

from .fixed_operand import _KEYS, PATH_TFP, PATH_TTP, FixedOperand, _comm, _flat_open, _rand, _split, _ttp


def available(fixed) -> bool:
    """Whether the three-operand route runs for this fixed operand and session: TFP or the TTP dealer, 2 parties,
    CPU tensors (its int64 contractions use torch's CPU kernels; CUDA has no int64 matmul and keeps the two-operand
    route)."""
    return (
        isinstance(fixed, FixedOperand)
        and fixed.path in (PATH_TFP, PATH_TTP)
        and _comm().get_world_size() == 2
        and fixed.w.share.device.type in ("cpu", "meta")
    )  # meta: a dry run of a CPU party


def _shared(plain, size, dev):
    """This party's share of ``plain`` (party 0's tensor; others pass None): pseudo-random zero sharing, no traffic."""
    from crypten.mpc.primitives import ArithmeticSharedTensor

    return ArithmeticSharedTensor(plain, size=size, precision=0, src=0, device=dev).share


def _sel(o, x):
    """``Σ_j o[h,r,j] x[h,r,j,...]``: a one-hot (or its mask / opening) contracted with slot-laid-out rows (a loop
    over the g slots: ~1.7x faster than an int64 bmm, which has no BLAS route)."""
    h, r, g = (int(s) for s in o.shape)
    xs = x.reshape(h, r, g, -1)
    out = o[:, :, 0, None] * xs[:, :, 0]
    for j in range(1, g):
        out += o[:, :, j, None] * xs[:, :, j]
    return out.reshape(h, r, *x.shape[3:])


class OpenedOneHot:
    """A one-hot ``O`` (scale 1, ring 0/1) with its mask drawn: ``[A]`` (and ``A`` itself on TFP party 0; under
    TTP the dealer's key for ``A``), and ``E = O - A`` once opened. Used by :func:`gathered_scores` (which opens
    ``E``) and then :func:`gathered_values` (same ``E, A``). Under TTP every party draws its share of ``A`` from the
    seed it shares with the dealer and party 0 registers ``A`` with the dealer (a request without answer)."""

    def __init__(self, onehot):
        self.onehot = onehot
        dev, size = onehot.share.device, onehot.share.size()
        rank = _comm().get_rank()
        self.e, self.key = None, None
        if _ttp_session():
            self.a_plain, self.key = None, next(_KEYS)  # the same counter on every party
            self.a = _rand(size, dev, _ttp().generator(dev))
            if rank == 0:
                _ttp().request("fixed_register", dev, ([(self.key, tuple(size))],))
        else:
            self.a_plain = _rand(size, dev) if rank == 0 else None
            self.a = _shared(self.a_plain, size, dev)


def _ttp_session() -> bool:
    from .fixed_operand import _path

    return _path() == PATH_TTP


def _slots(fixed: FixedOperand, start: int, n_cand: int, blk: int, idx: torch.Tensor) -> FixedOperand:
    """The fixed (Hkv, L, d) cache's candidate blocks laid out as the compact one-hot's slots: (Hkv, k, g, blk, d)
    (public views: the same D, B and share re-arranged, nothing opened)."""
    hkv, d = int(fixed.shape[0]), int(fixed.shape[-1])
    k, g = (int(s) for s in idx.shape)
    blocks = fixed[:, start : start + n_cand * blk].reshape(hkv, n_cand, blk * d)
    where = idx.reshape(-1)
    if fixed.d.device.type != "meta":  # (a dry run keeps the public indices on the CPU: the TTP recipe lists them)
        where = where.to(fixed.d.device)
    return blocks.index_select(1, where).reshape(hkv, k, g, blk, d)


def _finish(z, like, scale):
    """Shares ``z`` (ring, product scale ``like.scale * 2^16``) -> an MPCTensor at ``like``'s scale (truncated)."""
    from crypten.mpc.primitives import ArithmeticSharedTensor

    out = ArithmeticSharedTensor.from_shares(z)
    out.encoder = like.encoder
    out = out.div_(scale)  # local truncation in 2PC
    res = like.shallow_copy()
    res._tensor = out
    return res


# ---- the dealer's D-free terms (TTP): computed by the dealer, shapes known to every party ---------------------------
def score_term_sizes(hkv, G, k, g, blk, d) -> list[tuple]:
    """Sizes of ``[A⊙B]``, ``[a⊗B]``, ``[a⊗A]``, ``[a·A·B]`` for the scores (the dealer's answer, in order)."""
    return [(hkv, k, blk, d), (hkv, G, k, g, blk), (hkv, G, d, k, g), (hkv, G, k, blk)]


def dealer_score_terms(a, A, B) -> list[torch.Tensor]:
    """The scores' D-free mask products from a (Hkv, G, d), A (Hkv, k, g), B (Hkv, k, g, blk, d) (dealer side)."""
    AB = _sel(A, B)  # A ⊙ B, summed over the slots
    return [
        AB,
        torch.einsum("hgd,hrjid->hgrji", a, B),  # a ⊗ B (uncontracted in j)
        torch.einsum("hgd,hrj->hgdrj", a, A),  # a ⊗ A: contracted with D by each party
        torch.einsum("hgd,hrid->hgri", a, AB),  # a·A·B
    ]


def value_term_sizes(hkv, G, k, g, blk, dv) -> list[tuple]:
    """Sizes of ``[A⊙B]``, ``[a'⊗B]``, ``[a'⊗A]``, ``[a'·A·B (+ a''·B_rest)]`` for the output (in order)."""
    return [(hkv, k, blk, dv), (hkv, G, k, g, dv), (hkv, G, k, blk, g), (hkv, G, dv)]


def dealer_value_terms(a, A, B) -> list[torch.Tensor]:
    """The output's D-free mask products from a' (Hkv, G, k·blk), A (Hkv, k, g), B (Hkv, k, g, blk, dv)."""
    hkv, kk, _, blk, _ = (int(s) for s in B.shape)
    ap = a.reshape(hkv, int(a.shape[1]), kk, blk)
    AB = _sel(A, B)
    return [
        AB,
        torch.einsum("hgri,hrjiv->hgrjv", ap, B),
        torch.einsum("hgri,hrj->hgrij", ap, A),  # a' ⊗ A (r shared): contracted with D by each party
        torch.einsum("hgri,hriv->hgv", ap, AB),
    ]


def _dealer_terms(func: str, args: tuple, sizes: list[tuple], dev) -> list[torch.Tensor]:
    """This party's shares of the dealer's terms: party 0 posts the request (its answer, pending until the next
    opening, fills the views returned), party 1 draws them from its seed; same flat layout on both."""
    total = sum(int(torch.Size(s).numel()) for s in sizes)
    cl = _ttp()
    if _comm().get_rank() == 0:
        flat = cl.request(func, dev, args, (total,))
    else:
        flat = _rand((total,), dev, cl.generator(dev))
    return _split(flat, sizes)


def gathered_scores(q, oh: OpenedOneHot, k: FixedOperand, start: int, n_cand: int, blk: int, idx: torch.Tensor):
    """``S[h, γ, r, i] = Σ_{j,d} q[h,γ,d] O[h,r,j] K[h, cand(r,j)·blk + i, d]``: q (Hkv, G, d) shares (fixed-point),
    ``oh`` the (Hkv, k, g) compact one-hot (scale 1), K the fixed (Hkv, L, d) cache -> (Hkv, G, k·blk) at q's scale.
    Opens ``E = O - A`` (kept in ``oh`` for :func:`gathered_values`) and ``q - a``: 1 round, ``|O| + |q|`` elements.
    TTP: one dealer request (answer ``k·blk·d + G·k·g·blk + G·d·k·g + G·k·blk`` elements per KV head, no round).
    Leaks: shapes only (module docstring)."""
    q = getattr(q, "w", q)
    ks = _slots(k, start, n_cand, blk, idx)
    hkv, kk, g, _, d = (int(s) for s in ks.shape)
    G = int(q.shape[1])
    dev, rank = q.share.device, _comm().get_rank()
    out_size = torch.Size((hkv, G, kk, blk))
    if ks.path == PATH_TTP:
        a = _rand(q.share.size(), dev, _ttp().generator(dev))
        c1, t, aA, c4 = _dealer_terms(
            "gather_scores", (oh.key, ks.spec, tuple(q.share.size())), score_term_sizes(hkv, G, kk, g, blk, d), dev
        )
    else:
        a_plain = _rand(q.share.size(), dev) if rank == 0 else None
        a = _shared(a_plain, q.share.size(), dev)
        if rank == 0:
            A, B, D = oh.a_plain, ks.b_plain, ks.d
            c1 = _sel(A, B)  # A ⊙ B
            t = torch.einsum("hgd,hrjid->hgrji", a_plain, B)  # a ⊗ B (uncontracted in j)
            c4 = torch.einsum("hgd,hrid->hgri", a_plain, _sel(A, D + B))  # a·A·D + a·A·B
        else:
            c1 = t = c4 = None
        c1 = _shared(c1, torch.Size((hkv, kk, blk, d)), dev)
        t = _shared(t, torch.Size((hkv, G, kk, g, blk)), dev)
        c4 = _shared(c4, out_size, dev)
        aA = None
    e, E = _flat_open([q.share - a, oh.onehot.share - oh.a])  # (a TTP answer is complete after this exchange)
    oh.e = E
    # e·(E⊙[K] + [A]⊙D + [A⊙B]) + [a]·(E⊙D) + E·[a⊗B] + [a·A·D + a·A·B]   (pairwise contractions: cheap)
    z = torch.einsum("hgd,hrid->hgri", e, _sel(E, ks.w.share) + _sel(oh.a, ks.d) + c1)
    z = z + torch.einsum("hgd,hrid->hgri", a, _sel(E, ks.d))
    z = z + torch.einsum("hrj,hgrji->hgri", E, t) + c4
    if aA is not None:  # TTP: [a⊗A]·D, the D term the dealer must not compute
        z = z + torch.einsum("hgdrj,hrjid->hgri", aA, ks.d)
    return _finish(z.reshape(hkv, G, kk * blk), q, k.w.encoder.scale)


def gathered_values(
    p, oh: OpenedOneHot, v: FixedOperand, start: int, n_cand: int, blk: int, idx: torch.Tensor, rest=None
):
    """``o[h, γ, :] = Σ_{r,i,j} p[h,γ,r·blk+i] O[h,r,j] V[h, cand(r,j)·blk + i, :]`` for the selected rows'
    probabilities p (Hkv, G, k·blk) and the one-hot already opened by :func:`gathered_scores`; ``rest``: an optional
    ``(p_rest, v_rest)`` (shares, fixed rows) added as ``p_rest @ v_rest`` in the SAME opening. Opens ``p - a'``
    (and ``p_rest - a''``): 1 round, ``|p| (+ |p_rest|)`` elements. TTP: one dealer request (answer
    ``k·blk·dv + G·k·g·dv + G·k·blk·g + G·dv`` elements per KV head, no round; the rest's ``a''·B`` folded into
    the last term). Leaks: shapes only (module docstring)."""
    assert oh.e is not None, "gathered_values needs the one-hot opened by gathered_scores first"
    p = getattr(p, "w", p)
    vs = _slots(v, start, n_cand, blk, idx)
    hkv, kk, g, _, dv = (int(s) for s in vs.shape)
    G = int(p.shape[1])
    dev, rank = p.share.device, _comm().get_rank()
    psz = p.share.size()
    out_size = torch.Size((hkv, G, dv))
    ttp = vs.path == PATH_TTP
    gen = _ttp().generator(dev) if ttp else None
    a_plain = None if ttp or rank != 0 else _rand(psz, dev)
    a = _rand(psz, dev, gen) if ttp else _shared(a_plain, psz, dev)
    opens = [p.share - a]
    if rest is not None:
        p2, v2 = getattr(rest[0], "w", rest[0]), rest[1]
        a2_plain = None if ttp or rank != 0 else _rand(p2.share.size(), dev)
        a2 = _rand(p2.share.size(), dev, gen) if ttp else _shared(a2_plain, p2.share.size(), dev)
        opens.append(p2.share - a2)
    aA = None
    if ttp:
        args = (oh.key, vs.spec, tuple(psz))
        if rest is not None:
            args += (v2.spec, tuple(p2.share.size()))
        c1, t, aA, c4 = _dealer_terms("gather_values", args, value_term_sizes(hkv, G, kk, g, blk, dv), dev)
    else:
        if rank == 0:
            A, B, D = oh.a_plain, vs.b_plain, vs.d
            ap = a_plain.reshape(hkv, G, kk, blk)
            c1 = _sel(A, B)
            t = torch.einsum("hgri,hrjiv->hgrjv", ap, B)
            c4 = torch.einsum("hgri,hriv->hgv", ap, _sel(A, D + B))
            if rest is not None:
                c4 = c4 + torch.matmul(a2_plain, v2.b_plain)  # the rest's triple c = a'' @ B
        else:
            c1 = t = c4 = None
        c1 = _shared(c1, torch.Size((hkv, kk, blk, dv)), dev)
        t = _shared(t, torch.Size((hkv, G, kk, g, dv)), dev)
        c4 = _shared(c4, out_size, dev)
    opened = _flat_open(opens)
    e, E = opened[0].reshape(hkv, G, kk, blk), oh.e
    av = a.reshape(hkv, G, kk, blk)
    z = torch.einsum("hgri,hriv->hgv", e, _sel(E, vs.w.share) + _sel(oh.a, vs.d) + c1)
    z = z + torch.einsum("hgri,hriv->hgv", av, _sel(E, vs.d))  # [a']·(E⊙D)
    z = z + torch.einsum("hrj,hgrjv->hgv", E, t) + c4
    if aA is not None:  # TTP: [a'⊗A]·D, the D term the dealer must not compute
        z = z + torch.einsum("hgrij,hrjiv->hgv", aA, vs.d)
    if rest is not None:  # fixed_matmul's form, same opening
        z = z + torch.matmul(opened[1], v2.w.share) + torch.matmul(a2, v2.d)
    return _finish(z, p, v.w.encoder.scale)


def _selected_rows(
    onehot: torch.Tensor, x: torch.Tensor, start: int, n_cand: int, blk: int, idx: torch.Tensor
) -> torch.Tensor:
    """The rows of x (Hkv, L, d) the compact one-hot selects, (Hkv, k·blk, d) in g.apply order (float64)."""
    hkv, d = int(x.shape[0]), int(x.shape[-1])
    kk, g = (int(s) for s in idx.shape)
    blocks = x[:, start : start + n_cand * blk].reshape(hkv, n_cand, blk, d).double()[:, idx.reshape(-1)]
    sel = torch.einsum("hrj,hrjid->hrid", onehot.double(), blocks.reshape(hkv, kk, g, blk, d))
    return sel.reshape(hkv, kk * blk, d)


def gathered_reference(
    q: torch.Tensor, onehot: torch.Tensor, k: torch.Tensor, start: int, n_cand: int, blk: int, idx: torch.Tensor
) -> torch.Tensor:
    """The float model of :func:`gathered_scores`: the masks cancel exactly in the ring, so it is the plain product
    of q with the selected rows (float64)."""
    return q.double() @ _selected_rows(onehot, k, start, n_cand, blk, idx).transpose(1, 2)


def gathered_values_reference(
    p: torch.Tensor,
    onehot: torch.Tensor,
    v: torch.Tensor,
    start: int,
    n_cand: int,
    blk: int,
    idx: torch.Tensor,
    rest=None,
) -> torch.Tensor:
    """The float model of :func:`gathered_values`: p times the selected rows of v, plus ``p_rest @ v_rest``."""
    out = p.double() @ _selected_rows(onehot, v, start, n_cand, blk, idx)
    return out if rest is None else out + rest[0].double() @ rest[1].double()
