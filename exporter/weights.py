"""Request weights of the Binance endpoints the exporter calls (Binance's docs), and the
weight of the endpoints an event moved (a triggered read: the balance alone is 20, the
account alone 20, both 40). Standard library only: the collectors (whose weights sum to
a full refresh's w: exporter.collectors.refresh_weight), the client, the budget, the
triggers and the price source read these figures from here.

`ticker_price` is on the spot API (api.binance.com), which counts weight in a pool of its
own, apart from the PM API's: it is spent from the price source's budget, never the PM one.
`fapi_time` and `spot_time` (the server time) are spent from their hosts' budgets too.
"""

from __future__ import annotations

from collections.abc import Iterable

#: request weight of each endpoint, per Binance's docs
WEIGHTS = {
    "balance": 20,
    "account": 20,
    # GET /papi/v1/um/account and /papi/v1/cm/account (exporter/collectors/)
    "um_account": 5,
    "cm_account": 5,
    "listen_key": 1,
    "ticker_price": 4,
    # the server time: GET /fapi/v1/time (futures host), else GET /api/v3/time (spot host)
    "fapi_time": 1,
    "spot_time": 1,
}

#: the spot API's request-weight limit per IP and minute (its own pool, Binance's docs)
SPOT_IP_WEIGHT_LIMIT_PER_MINUTE = 6000
#: the USD-M futures API's request-weight limit per IP and minute (its own pool too)
FAPI_IP_WEIGHT_LIMIT_PER_MINUTE = 2400


def read_weight(endpoints: Iterable[str]) -> int:
    """The weight of one read of an account's `endpoints` ("balance", "account")."""
    return sum(WEIGHTS[endpoint] for endpoint in endpoints)
