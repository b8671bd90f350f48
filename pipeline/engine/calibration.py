"""engine/calibration.py: how a server counts a request's tokens, compared with the published formula.

Relays, gateways, self-hosted servers and providers under another name count image tokens their own
way (issue 14: a server charging the gpt-4o tile rule for gpt-4o-mini counts 33× less than the
formula). `TokenCalibration` learns the ratio per model from the prompt tokens each answer reports,
and the limiter's reservations follow it; cost estimates keep the published formula. Plain
arithmetic: no clock, no I/O.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections import deque

__all__ = ["TokenCalibration", "CALIBRATION_WINDOW", "CALIBRATION_MIN_SAMPLES", "MAX_USED_TOKENS"]

log = logging.getLogger(__name__)

CALIBRATION_WINDOW = 31
"""Answers whose median ratio (reported / formula) scales the next reservations."""
CALIBRATION_MIN_SAMPLES = 3
"""Below this many answers the calibration may raise reservations, never lower them."""
MIN_RATIO, MAX_RATIO = 0.01, 100.0
"""A server's count is believed between these multiples of the formula's."""
MIN_VARIABLE_TOKENS = 16
"""Requests whose formula part (images) is smaller than this teach the calibration nothing."""
MAX_USED_TOKENS = 100_000_000
"""A reported count above this (or negative) is not believed."""


class TokenCalibration:
    """How the server counts a request's tokens compared with the published formula, per model.

    A reservation has a fixed part (text + `max_tokens`, counted alike everywhere) and a variable
    part (the images, by the model's published formula). Relays, gateways, self-hosted servers and
    providers under another name count images their own way, so the ratio of what the server
    reported for the variable part to what the formula said scales the variable part of the next
    reservations: the median of the last CALIBRATION_WINDOW answers (a few odd ones do not move
    it), starting from the formula (1.0). Until CALIBRATION_MIN_SAMPLES answers it may only raise
    reservations. A reservation is never below its fixed part. Plain arithmetic, no clock.
    """

    def __init__(self, window: int = CALIBRATION_WINDOW):
        self._window = window
        self._samples: dict[str, deque[float]] = {}
        self._told: set[str] = set()  # models whose different count was logged

    def ratio(self, model: str) -> float:
        """The server's count over the formula's, for the variable part; 1.0 while nothing is known."""
        samples = self._samples.get(model)
        if not samples:
            return 1.0
        median = statistics.median(samples)
        return median if len(samples) >= CALIBRATION_MIN_SAMPLES else max(1.0, median)

    def known(self, model: str) -> bool:
        """True once enough answers for `model` have said how the server counts (CALIBRATION_MIN_SAMPLES)."""
        return len(self._samples.get(model, ())) >= CALIBRATION_MIN_SAMPLES

    def reserve(self, model: str, estimate: int, fixed: int) -> int:
        """Tokens to reserve for a request the formula puts at `estimate`, `fixed` of them text + output."""
        fixed = max(0, min(fixed, estimate))
        return fixed + math.ceil((estimate - fixed) * self.ratio(model))

    def observe(self, model: str, estimate: int, fixed: int, used: int) -> None:
        """A request the formula put at `estimate` (`fixed` of it text + output) was counted `used`.

        Ignored when the formula part is too small to learn from or `used` is not a sane count.
        """
        variable = estimate - fixed
        if variable < MIN_VARIABLE_TOKENS or isinstance(used, bool) or not isinstance(used, int):
            return
        if not 0 <= used <= MAX_USED_TOKENS:
            return
        samples = self._samples.setdefault(model, deque(maxlen=self._window))
        samples.append(min(MAX_RATIO, max(MIN_RATIO, (used - fixed) / variable)))
        ratio = self.ratio(model)
        if len(samples) >= CALIBRATION_MIN_SAMPLES and model not in self._told and not 0.8 <= ratio <= 1.25:
            self._told.add(model)
            log.info("the server counts %s's image tokens at %.3g× the published formula; reserving that", model,
                     ratio)
