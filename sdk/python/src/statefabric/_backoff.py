"""Exponential backoff with full jitter, for the loops that reconnect."""

from __future__ import annotations

import random


class Backoff:
    def __init__(self, first: float = 0.05, most: float = 2.0) -> None:
        self._first, self._most, self._attempt = first, most, 0

    def next(self) -> float:
        """Seconds to wait before the next try."""
        ceiling = min(self._most, self._first * (2**self._attempt))
        self._attempt = min(self._attempt + 1, 16)
        return random.uniform(0, ceiling)

    def reset(self) -> None:
        self._attempt = 0
