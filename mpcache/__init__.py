"""mpcache: private LLM inference under MPC (CrypTen) with MPC-friendly KV-cache eviction (MPCache).

Importing the package has no side effects: CrypTen is imported (and patched) only by ``mpcache.mpc.session``.
"""

__version__ = "0.1.0"
