"""The small op set the model and the cache policies are written against: plaintext (torch) and secure (CrypTen)."""

from .plain import PlainBackend

__all__ = ["PlainBackend"]
