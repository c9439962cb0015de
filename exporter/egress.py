"""What the requests on one egress tell its weight budget and the metrics.

The poller (PM API) and the price source (spot API) each own a budget; every request
they make is counted the same way, and a 429, 418 or firewall 403 pauses the budget's
egress the same way. Both call this one ledger.
"""

from __future__ import annotations

import structlog

from exporter.binance import errors
from exporter.binance.client import RequestReport
from exporter.budget import WeightBudget
from exporter.selfmetrics import Instruments
from exporter.weights import WEIGHTS

log = structlog.get_logger("exporter.egress")


class EgressLedger:
    """Counts one egress's requests in the metrics and its budget; pauses it when told."""

    def __init__(self, budget: WeightBudget, instruments: Instruments) -> None:
        self.budget = budget
        self._instruments = instruments

    def observe(self, report: RequestReport, clock_offset: float) -> None:
        """Called for every request: metrics, the weight spent, the IP's used weight."""
        log.debug(
            "request",
            endpoint=report.endpoint,
            outcome=report.outcome,
            seconds=round(report.duration, 4),
            used_weight=report.used_weight,
        )
        self._instruments.requests.labels(report.endpoint, report.outcome).inc()
        self._instruments.duration.labels(report.endpoint).observe(report.duration)
        if report.sent:  # a reset mid-response spent its weight too; a refused connect did not
            weight = report.weight
            self.budget.count_sent(WEIGHTS[report.endpoint] if weight is None else weight)
        was_paused = self.budget.paused_until
        self.budget.note_used_weight(report.used_weight, self.budget.now(), clock_offset)
        if self.budget.paused_until != was_paused:
            self._log_pause()

    def note_error(self, exc: BaseException, clock_offset: float) -> None:
        """Pause the egress after a 429, 418 or firewall 403; other errors change nothing."""
        now = self.budget.now()
        if isinstance(exc, errors.IpBanned):
            self.budget.banned(exc.retry_after, exc.banned_until, now, clock_offset)
        elif isinstance(exc, errors.RateLimited):  # a 429, or a 403 of the WAF
            self.budget.rate_limited(exc.retry_after, now, clock_offset, reason=exc.outcome)
        else:
            return
        self._log_pause()

    def _log_pause(self) -> None:
        log.warning(
            "requests_paused",
            egress=self.budget.egress,
            reason=self.budget.pause_reason,
            until=round(self.budget.paused_until, 3),
            used_weight=self.budget.last_used_weight,
        )
