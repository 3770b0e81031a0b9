"""MPC plumbing: CrypTen compatibility shims, the session (MPI -> torch.distributed -> CrypTen), the cost ledger,
and our secure protocols."""
