"""Request weights of the PM API endpoints the exporter calls (Binance's docs), and the
weight of one account refresh. Standard library only: the client, the budget, the poller
and the --check-config summary all read these figures from here."""

from __future__ import annotations

#: request weight of each endpoint, per Binance's docs
WEIGHTS = {"balance": 20, "account": 20, "time": 1, "listen_key": 1}


def refresh_weight(account_info: bool) -> int:
    """w: the weight of one account refresh, balance plus account info when collected."""
    return WEIGHTS["balance"] + (WEIGHTS["account"] if account_info else 0)
