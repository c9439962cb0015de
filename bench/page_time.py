"""Page time at scale (issue 9): a negative balance set in the simulator, to its firing
`BinancePMNegativeBalance` at the webhook, through the real Prometheus (1 s scrape and
evaluation) and Alertmanager (group_wait 1 s) of the end-to-end tests (tests/support/e2estack.py).
200 accounts on the default budget (polling alone refreshes each every 323 s), run twice:

1. streams on: from the moment every stream is open, 20 tries on distinct random
   accounts, one after the other, each 2-3 s after the previous page arrived;
2. `stream: {enabled: false}`: from the moment the stack answers, 20 negative balances
   set at once on distinct random accounts, each timed to its own page (its account's
   round-robin turn comes within 323 s).

With `--trade-rate N` the simulator's desk trades N fills a second meanwhile (issue 16).

    PYTHONPATH=. python bench/page_time.py [--trade-rate 5]     # ~9 min
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, median, table

sys.path.insert(0, str(ROOT / "tests"))
from support.e2estack import ALERT, PAGE_ASSET, STARTING, Stack, e2e_stack, page_times
from support.waits import wait_until

ACCOUNTS = 200
TRIES = 20
#: polling only: the longest round-robin interval (323 s) and the pipeline's few seconds
POLLING_TIMEOUT = 360.0


def streams_on(stack: Stack, rng: random.Random) -> list[float]:
    wait_until(stack.streams_up, 120, "every stream open", step=0.5, ignoring=STARTING)
    tried = rng.sample(stack.accounts, TRIES)
    return [page.paged for page in page_times(stack, tried, lambda: rng.uniform(2.0, 3.0), 30)]


def polling_only(stack: Stack, rng: random.Random) -> list[float]:
    changed = {}
    for account in rng.sample(stack.accounts, TRIES):
        changed[account] = time.monotonic()
        stack.set_asset(account, PAGE_ASSET, negativeBalance="12.5")
    arrived = stack.webhook.first_firing(ALERT, set(changed), POLLING_TIMEOUT)
    missing = sorted(changed.keys() - arrived.keys())
    if missing:
        raise SystemExit(f"no page within {POLLING_TIMEOUT} s for {missing}\n{stack.logs()}")
    return [arrived[account] - at for account, at in changed.items()]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trade-rate", type=float, default=0.0, metavar="N")
    trade_rate = parser.parse_args().trade_rate
    rows = []
    for label, stream, run in (
        ("streams on", True, streams_on),
        ("polling only (`stream: {enabled: false}`)", False, polling_only),
    ):
        with tempfile.TemporaryDirectory() as work:
            began = time.monotonic()
            with e2e_stack(
                Path(work), accounts=ACCOUNTS, stream=stream, trade_rate=trade_rate
            ) as stack:
                times = run(stack, random.Random(9))
            took = time.monotonic() - began
        rows.append((label, len(times), median(times), max(times), took))
        print(f"{label}: {', '.join(f'{t:.2f}' for t in sorted(times))}", flush=True)
    print()
    print(
        table(
            ["200 accounts, default budget", "tries", "median page (s)", "worst (s)", "run (s)"],
            rows,
        )
    )


if __name__ == "__main__":
    main()
