"""A simulator of the Binance Portfolio Margin API, on loopback, for the demo and the tests.

    from exporter.simulator import Simulator, SimAccount
    with Simulator([SimAccount.hmac("desk-a", "key", "secret")]) as sim:
        ...  # point the exporter at sim.url; set balances, inject faults, read sim.requests

state.py holds the data, faults, weight and listenKeys; auth.py the key and signature
checks; endpoints.py the API's answers; admin.py the /_sim/ controls; server.py the HTTP;
events.py the user data stream's events; stream.py its WebSocket server (`sim.stream_url`).
"""

from exporter.simulator.auth import SimAccount
from exporter.simulator.server import Simulator
from exporter.simulator.state import FAULT_KINDS, RequestRecord

__all__ = ["FAULT_KINDS", "RequestRecord", "SimAccount", "Simulator"]
