"""Independent protocols in lockstep: their openings merged into shared exchanges (rounds = the longest, not the sum).

``parallel(f, g)`` runs ``f()`` and ``g()`` -- two protocols whose inputs are ready and which do not depend on each
other (a comparison and a polynomial of the same x) -- so that every round of one travels in the same exchange as
the corresponding round of the other: the rounds are max(r_f, r_g) instead of r_f + r_g; the bytes are unchanged.

How: each branch runs as a greenlet (a coroutine with its own stack, switched in ~0.4 us; threads took ~64 us a
handoff here) in a fixed order, so every party executes the same deterministic interleaving: the same randomness draws, the same
dealer requests, in the same order, as a sequential run of the same code would in some order. A branch that
reaches an opening (the communicator's ``all_reduce``: every arithmetic and binary opening of 2PC, a Beaver
product's ``x - a`` and ``y - b``, an AND's ``x ^ a`` and ``y ^ b``) parks it and switches back; once every
live branch has parked an opening or finished, the openings go out as ONE exchange (one message per peer:
``CountingCommunicator.merged_all_reduce``, one round in the ledger, the bytes of all), each branch gets its part
and runs on to its next opening, in branch order. Every other transfer (a broadcast, a dealer request, 3PC's
point-to-point resharing) runs where the branch reaches it, in the same order on every party: correct, only not
merged. A branch that raises ends the call with its exception (the parties' job then fails as any failed op does).

Leakage: none. The schedule (which opening goes with which) is a function of the code and the public shapes only,
identical on every party and for every secret input (tests/test_lockstep.py checks the bytes and rounds).
Cost of the machinery: two greenlet switches per branch and round (~1 us). What it buys is network latency (one
RTT per merged round); on this 2-core loopback machine a token's seconds are set by the ops' local work, which
merging does not change (experiments/RESULTS.md, session 9). Branches must not share mutable state: CrypTen's
Beaver protocol mutated its operands' (shared) encoder objects while an opening is pending, which compat patch 8
(``own_ignored_encodings``) makes per operand.

Used by: SiLU/GeLU (the breakpoints' comparison in lockstep with the polynomial, and with the MLP gate's
products), the anchored softmax (the guard's comparison in lockstep with the exp), the norms (the next layer's
product beside the polynomial) and a decode step (the softmax's offset beside the norm; the new K/V row's fixing,
the logits and the offset's scaling in one round: ``Transformer._decode_offset``). Calls nest: a branch that runs
its own branches parks their openings as one request of its own (``_Nested``), so every level shares the
outermost exchanges. ``MpcConfig.lockstep = False`` runs the branches one after the other
(the ablation: the same function and bytes, more rounds; the randomness is drawn in another order, so the ulps of
the probabilistic truncations differ, within the same bounds).
"""

from __future__ import annotations

#: (get, set) pairs of per-branch state besides the ledger's scope path, saved and restored at every switch (the
#: reveal audit's nesting depth registers here)
SWITCHED: list = []


class _Branch:
    def __init__(self, fn, ledger):
        import greenlet

        self.fn, self.ledger = fn, ledger
        self.stack = list(ledger._stack) if ledger is not None else None  # its own scope path
        self.state = [get() for get, _ in SWITCHED]
        self.request = None  # (input, op, batched): the opening it waits on
        self.done, self.result, self.error, self.started = False, None, None, False
        self.glet = greenlet.greenlet(self._main)

    def _main(self):
        try:
            self.result = self.fn()
        except BaseException as e:  # noqa: BLE001 - handed to the caller, re-raised there
            self.error = e
        self.done = True

    def run_until_parked(self, reply=None):
        """Switch into this branch; return when it parks an opening or finishes."""
        saved_stack = self.ledger._stack if self.ledger is not None else None
        saved = [get() for get, _ in SWITCHED]
        if self.ledger is not None:
            self.ledger._stack = self.stack
        for (_, put), v in zip(SWITCHED, self.state):
            put(v)
        try:
            self.glet.switch(reply) if self.started else self.glet.switch()
            self.started = True
        finally:
            self.state = [get() for get, _ in SWITCHED]
            for (_, put), v in zip(SWITCHED, saved):
                put(v)
            if self.ledger is not None:
                self.ledger._stack = saved_stack

    def park(self, request):
        """(Inside the branch) park an opening; return its result once the merged exchange is done."""
        self.request = request
        return self.glet.parent.switch()


_CURRENT: list = [None]  # the branch running now (None: the caller)


def current_branch():
    """The lockstep branch running now, or None."""
    return _CURRENT[0]


class _Nested:
    """The openings a nested :func:`parallel` (called inside a branch) parked in one round: its enclosing branch
    parks them as ONE request, so they travel in the enclosing call's merged exchange (flattened by :func:`_merge`)."""

    def __init__(self, requests: list):
        self.requests = requests


def _merge(merge, requests: list) -> list:
    """``merge`` (the communicator's ``merged_all_reduce``) over the requests with every :class:`_Nested` one
    flattened; the replies re-nested the same way (one list of replies per nested request)."""
    flat: list = []

    def walk(r):
        if isinstance(r, _Nested):
            return [walk(x) for x in r.requests]
        flat.append(r)
        return len(flat) - 1

    shape = [walk(r) for r in requests]
    out = merge(flat)

    def build(s):
        return [build(x) for x in s] if isinstance(s, list) else out[s]

    return [build(s) for s in shape]


def parallel(*fns, enabled: bool = True):
    """``[f() for f in fns]``, with the openings of the branches merged round by round (see the module docstring).
    ``enabled=False`` (or a single branch) runs them one after the other. Called inside a branch (a protocol that
    runs its own branches, inside a caller's), its branches' openings of each round are parked by the enclosing
    branch as one request: every level travels in the outermost call's exchanges."""
    import sys

    comm = sys.modules.get("crypten.communicator")  # not imported: no session to merge in
    if not enabled or len(fns) < 2 or comm is None or not comm.is_initialized():
        return [f() for f in fns]
    inst = comm.get()
    merge = getattr(inst, "merged_all_reduce", None)
    if merge is None:  # not a counting communicator: nothing to merge into
        return [f() for f in fns]
    outer = current_branch()
    ledger = getattr(inst, "ledger", None)
    branches = [_Branch(f, ledger) for f in fns]
    replies = [None] * len(branches)
    while True:
        for i, b in enumerate(branches):
            if b.done:
                continue
            _CURRENT[0] = b
            try:
                b.run_until_parked(replies[i])
            finally:
                _CURRENT[0] = outer
            if b.error is not None:
                raise b.error
        waiting = [i for i, b in enumerate(branches) if not b.done]
        if not waiting:
            return [b.result for b in branches]
        requests = [branches[i].request for i in waiting]
        out = outer.park(_Nested(requests)) if outer is not None else _merge(merge, requests)
        for i, r in zip(waiting, out):
            branches[i].request, replies[i] = None, r


__all__ = ["SWITCHED", "current_branch", "parallel"]
