"""Independent protocols in lockstep: their openings merged into shared exchanges (rounds = the longest, not the sum).

``parallel(f, g)`` runs ``f()`` and ``g()`` -- two protocols whose inputs are ready and which do not depend on each
other (a comparison and a polynomial of the same x) -- so that every round of one travels in the same exchange as
the corresponding round of the other: the rounds are max(r_f, r_g) instead of r_f + r_g; the bytes are unchanged.

How: each branch runs in a thread of its own, but only one thread ever runs at a time (a baton, handed over in a
fixed order), so every party executes the same deterministic interleaving: the same randomness draws, the same
dealer requests, in the same order, as a sequential run of the same code would in some order. A branch that
reaches an opening (the communicator's ``all_reduce``: every arithmetic and binary opening of 2PC, a Beaver
product's ``x - a`` and ``y - b``, an AND's ``x ^ a`` and ``y ^ b``) parks it and hands the baton on; once every
live branch has parked an opening or finished, the openings go out as ONE exchange (one message per peer:
``CountingCommunicator.merged_all_reduce``, one round in the ledger, the bytes of all), each branch gets its part
and runs on to its next opening, in branch order. Every other transfer (a broadcast, a dealer request, 3PC's
point-to-point resharing) runs where the branch reaches it, in the same order on every party: correct, only not
merged. A branch that raises ends the call with its exception (the parties' job then fails as any failed op does).

Leakage: none. The schedule (which opening goes with which) is a function of the code and the public shapes only,
identical on every party and for every secret input (tests/test_lockstep.py checks the bytes and rounds).
Cost of the machinery: two thread switches per branch and round (~20-50 us of CPU each), against ~0.8 ms of CPU per
round saved on this machine (experiments/RESULTS.md, session 9).

Used by: SiLU/GeLU (the breakpoints' comparison in lockstep with the polynomial) and the anchored softmax (the
guard's comparison in lockstep with the exp). ``MpcConfig.lockstep = False`` runs the branches one after the other
(the ablation: the same function and bytes, more rounds; the randomness is drawn in another order, so the ulps of
the probabilistic truncations differ, within the same bounds).
"""

from __future__ import annotations

import contextlib
import threading

_LOCAL = threading.local()  # .branch: the _Branch the current thread runs (None in the main thread)


class _Branch:
    def __init__(self, fn, ledger, modes, grad: bool):
        self.fn, self.ledger, self.modes, self.grad = fn, ledger, modes, grad
        self.stack = list(ledger._stack) if ledger is not None else None  # its own scope path
        self.go, self.paused = threading.Event(), threading.Event()
        self.request = None  # (input, op, batched): the opening it waits on
        self.reply = None
        self.done, self.result, self.error = False, None, None
        self.thread = threading.Thread(target=self._main, daemon=True)

    def _main(self):
        import torch

        _LOCAL.branch = self
        self.go.wait()
        self.go.clear()
        try:
            # torch's function modes (a dry run's meta-device mode) and grad mode are per thread: the caller's
            with contextlib.ExitStack() as stack, torch.set_grad_enabled(self.grad):
                for mode in self.modes:
                    stack.enter_context(mode)
                self.result = self.fn()
        except BaseException as e:  # noqa: BLE001 - handed to the caller, re-raised there
            self.error = e
        self.done = True
        self.paused.set()

    def run_until_parked(self):
        """Hand this branch the baton; return when it parks an opening or finishes."""
        if self.ledger is not None:
            self.ledger._stack = self.stack
        self.paused.clear()
        self.go.set()
        self.paused.wait()

    def park(self, request):
        """(In the branch's thread) park an opening; return its result once the merged exchange is done."""
        self.request, self.reply = request, None
        self.paused.set()
        self.go.wait()
        self.go.clear()
        reply, self.reply = self.reply, None
        return reply


def current_branch():
    """The lockstep branch this thread runs, or None."""
    return getattr(_LOCAL, "branch", None)


def parallel(*fns, enabled: bool = True):
    """``[f() for f in fns]``, with the openings of the branches merged round by round (see the module docstring).
    ``enabled=False`` (or a call from inside a branch, or a single branch) runs them one after the other."""
    import crypten.communicator as comm

    if not enabled or len(fns) < 2 or current_branch() is not None or not comm.is_initialized():
        return [f() for f in fns]
    inst = comm.get()
    merge = getattr(inst, "merged_all_reduce", None)
    if merge is None:  # not a counting communicator: nothing to merge into
        return [f() for f in fns]
    ledger = getattr(inst, "ledger", None)
    saved = ledger._stack if ledger is not None else None
    import torch

    modes = torch.overrides._get_current_function_mode_stack()
    branches = [_Branch(f, ledger, modes, torch.is_grad_enabled()) for f in fns]
    for b in branches:
        b.thread.start()
    try:
        while True:
            live = [b for b in branches if not b.done]
            for b in live:
                b.run_until_parked()
                if b.error is not None:
                    raise b.error
            waiting = [b for b in branches if not b.done and b.request is not None]
            if not waiting:
                break
            if ledger is not None:
                ledger._stack = saved
            replies = merge([b.request for b in waiting])
            for b, r in zip(waiting, replies):
                b.request, b.reply = None, r
    finally:
        if ledger is not None:
            ledger._stack = saved
    return [b.result for b in branches]


__all__ = ["current_branch", "parallel"]
