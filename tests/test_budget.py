"""Weight-budget arithmetic and pauses, with explicit times."""

import asyncio

import pytest

from exporter.budget import (
    GUARD_SECONDS,
    BudgetLimits,
    WeightBudget,
    next_minute,
    refresh_interval,
    shard_limits,
)
from exporter.config import BudgetSettings

LIMITS = BudgetLimits(limit_per_minute=6000, share=0.25, high_water=0.8)


def budget() -> WeightBudget:
    return WeightBudget("default", LIMITS, clock=lambda: 0.0)


def test_refresh_interval_is_n_w_over_b_or_the_floor() -> None:
    # The worked example: 10 accounts, w = 40, B = 1500 -> every 16 s.
    assert refresh_interval(10, 40, BudgetLimits(6000, 0.25, 0.8), 10) == pytest.approx(
        16, rel=0.01
    )
    assert refresh_interval(1, 40, BudgetLimits(6000, 0.25, 0.8), 10) == 10


def test_shards_split_the_budget_from_the_plain_settings() -> None:
    settings = BudgetSettings(ip_weight_limit_per_minute=6000, share=0.25, ip_high_water=0.8)
    assert shard_limits(settings) == LIMITS
    quarter = shard_limits(settings, 4)
    assert quarter.per_minute == 375  # B / 4: the IP still sees B from the four together
    assert (quarter.limit_per_minute, quarter.high_water) == (6000, 0.8)  # the IP's own figures


def test_reservations_are_paced_evenly_with_no_burst() -> None:
    b = budget()  # B = 1500/min -> 40 weight every 1.6 s (1.61 over the guard window)
    assert b.delay(40, 100.0) == 0
    b.reserve(40, 100.0)
    assert b.delay(40, 100.0) == pytest.approx(40 / 1500 * GUARD_SECONDS)
    assert b.delay(40, 101.62) == 0


def test_no_window_ever_holds_more_than_the_budget() -> None:
    b = WeightBudget("default", BudgetLimits(1200, 1.0, 0.8), clock=lambda: 0.0)
    now, starts = 0.0, []
    while now < 600:
        wait = b.delay(40, now)
        if wait > 0:
            now += wait
            continue
        b.reserve(40, now)
        starts.append(now)
    for t in starts:
        in_window = [s for s in starts if t <= s < t + GUARD_SECONDS]
        assert len(in_window) * 40 <= 1200
    # and the budget is spent, not hoarded: >= 95% over the run
    assert len(starts) * 40 >= 0.95 * 1200 * 10


def test_high_water_pauses_until_the_next_minute_of_the_server_clock() -> None:
    b = budget()
    b.note_used_weight(4799, now=130.0, clock_offset=0.0)
    assert not b.is_paused(130.0)
    b.note_used_weight(4800, now=130.0, clock_offset=0.0)
    assert b.paused_until == pytest.approx(180.5)
    assert b.delay(20, 150.0) == pytest.approx(30.5)
    assert b.pauses["high_water"] == 1
    # with the server 3 s ahead, its minute ends 3 s earlier on our clock
    assert next_minute(130.0, 3.0) == pytest.approx(177.5)


def test_rate_limited_and_banned_pauses() -> None:
    b = budget()
    b.rate_limited(retry_after=7, now=10.0, clock_offset=0.0)
    assert b.paused_until == 17.0
    b.rate_limited(retry_after=None, now=10.0, clock_offset=0.0)
    assert b.paused_until == 60.5
    b.banned(retry_after=None, banned_until=1000.0, now=10.0, clock_offset=0.0)
    assert b.paused_until == 1000.5
    b2 = budget()
    b2.banned(retry_after=None, banned_until=None, now=10.0, clock_offset=0.0)
    assert b2.paused_until == 130.0
    assert b2.pauses["banned"] == 1
    # an end already past (a stale message, a clock far off): still a ban, of 2 minutes
    b3 = budget()
    b3.banned(retry_after=None, banned_until=5.0, now=10.0, clock_offset=0.0)
    assert b3.paused_until == 130.0


def test_a_request_larger_than_the_budget_is_refused() -> None:
    tiny = WeightBudget("default", BudgetLimits(10, 1.0, 0.8))
    with pytest.raises(ValueError, match="exceeds the whole budget"):
        asyncio.run(tiny.acquire(20))


@pytest.mark.parametrize("new_share", [0.125, 0.5])
def test_new_limits_never_make_a_burst(new_share: float) -> None:
    """A reload's budget change keeps the spending log: a window ending after the change
    holds at most the new budget, and a raised budget is spent at its pace, not at once."""
    b = budget()  # 1500/min
    now, spent = 0.0, []

    def spend_until(end: float) -> None:
        nonlocal now
        while now < end:
            while (wait := b.delay(40, now)) > 0:  # as acquire() does
                now += wait
            b.reserve(40, now)
            spent.append(now)

    spend_until(120.0)
    changed_at = now
    b.set_limits(BudgetLimits(6000, new_share, 0.8))
    new = b.settings.per_minute
    spend_until(300.0)
    after = [t for t in spent if t > changed_at]
    for end in after:
        in_window = [t for t in spent if end - GUARD_SECONDS + 1e-6 < t <= end]
        if new < LIMITS.per_minute or end - GUARD_SECONDS > changed_at:
            assert 40 * len(in_window) <= new
    gaps = [b - a for a, b in zip([changed_at, *after], after, strict=False)]
    assert min(gaps) >= min(40 / LIMITS.per_minute, 40 / new) * GUARD_SECONDS - 1e-9
