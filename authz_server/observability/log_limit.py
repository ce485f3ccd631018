"""Log lines a client can cause, rate-limited: a flood of malformed requests must not become a
flood of log output (1.4 MB/s was measured) that fills disks and drowns the useful lines.

Each :class:`RateLimitedLog` lets ``burst`` lines through per ``interval`` seconds and counts
the rest; the first line of the next window reports how many were suppressed.
"""

from __future__ import annotations

import logging
import time
from typing import Callable


class RateLimitedLog:
    def __init__(
        self,
        logger: logging.Logger,
        level: int = logging.WARNING,
        burst: int = 10,
        interval: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self._level = level
        self._burst = burst
        self._interval = interval
        self._clock = clock
        self._window_start = -interval
        self._logged = 0
        self.suppressed = 0

    def __call__(self, message: str, *args: object) -> None:
        now = self._clock()
        if now - self._window_start >= self._interval:
            if self.suppressed:
                self._logger.log(self._level, "%d similar lines suppressed in the last %.0f s",
                                 self.suppressed, now - self._window_start)
            self._window_start, self._logged, self.suppressed = now, 0, 0
        if self._logged < self._burst:
            self._logged += 1
            self._logger.log(self._level, message, *args)
        else:
            self.suppressed += 1
