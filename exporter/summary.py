"""What a config means for the weight budget: the check that the budget pays for an
account refresh, and the ``--check-config`` summary. Never prints a secret."""

from __future__ import annotations

from collections import Counter

from exporter.budget import GUARD_SECONDS, WINDOW_SECONDS, refresh_interval, shard_limits
from exporter.collectors import enabled, weight_of
from exporter.config import AccountConfig, Config, ConfigError
from exporter.shard import WHOLE, Shard
from exporter.weights import SPOT_IP_WEIGHT_LIMIT_PER_MINUTE, WEIGHTS


def check_budget(config: Config) -> None:
    """Raise ``ConfigError`` unless B pays for at least one whole account refresh a minute."""
    per_minute = shard_limits(config.budget).per_minute
    weight = weight_of(config.collect.switches())
    if per_minute < weight:
        raise ConfigError(
            [
                "budget.share: the budget ip_weight_limit_per_minute x share ="
                f" {per_minute:g} weight/min cannot pay for one account refresh ({weight} weight)"
            ]
        )


def summarize(config: Config, shard: Shard = WHOLE) -> str:
    """A few lines: endpoint, budget arithmetic, accounts with key type and egress, and
    this replica's accounts when there are several shards."""
    budget = config.budget
    weight = weight_of(config.collect.switches())
    limits = shard_limits(budget)
    per_minute = limits.per_minute
    high_water = budget.ip_high_water * budget.ip_weight_limit_per_minute
    assets = config.collect.assets
    lines = [
        f"binance: {config.binance.base_url} (recv_window {config.binance.recv_window_ms} ms,"
        f" timeout {_num(config.binance.timeout_seconds)} s)",
        "collect: "
        + " + ".join(
            f"{c.request.endpoint} ({c.request.weight})" for c in enabled(config.collect.switches())
        )
        + f" = {weight} weight per account refresh;"
        f" assets {', '.join(assets.include) or 'all'}"
        + (f" except {', '.join(assets.exclude)}" if assets.exclude else ""),
        f"budget: B = {budget.ip_weight_limit_per_minute} x {_num(budget.share)}"
        f" = {_num(per_minute)} weight/min per egress IP;"
        f" pause while the IP's used weight >= {_num(high_water)}"
        f" ({_num(budget.ip_high_water)} x {budget.ip_weight_limit_per_minute})",
        f"budget minute: {_num(GUARD_SECONDS)} s, Binance's {_num(WINDOW_SECONDS)} s plus"
        f" {_num(GUARD_SECONDS - WINDOW_SECONDS)} s for the network's jitter between our"
        " clock and Binance's: B is spent over it, so that no minute Binance counts holds"
        " more than B",
    ]
    stream = config.stream
    lines.append(
        f"stream: {config.binance.stream_url}/<listenKey>, one per account; an event refreshes"
        f" its account at most every {_num(stream.min_refresh_interval_seconds)} s, within"
        f" B/2 = {_num(per_minute / 2)} weight/min (intervals at most 2x under events)"
        if stream.enabled
        else "stream: disabled (polling only)"
    )
    for egress, count in Counter(a.route.label for a in config.accounts).items():
        by_budget = refresh_interval(count, weight, limits, 0.0)
        interval = refresh_interval(count, weight, limits, budget.min_interval_seconds)
        binding = "budget" if by_budget >= budget.min_interval_seconds else "min_interval"
        lines.append(
            f"refresh ({egress}): {count} account(s) x {weight} / {_num(per_minute)}"
            f" x {_num(GUARD_SECONDS)} s = {_num(by_budget)} s by budget,"
            f" min_interval {_num(budget.min_interval_seconds)}"
            f" s -> each account every {_num(interval)} s ({binding})"
        )
    lines.append(_prices_line(config))
    lines.append(_time_line(config))
    lines.append(
        f"accounts ({len(config.accounts)})"
        + (f", with those of {config.accounts_dir}/*.yaml" if config.accounts_dir else "")
        + ":"
    )
    width = max(len(a.name) for a in config.accounts)
    lines += [
        f"  {a.name:<{width}}  {a.key_type:<7}  egress={a.route.label}{_extras(a)}"
        for a in config.accounts
    ]
    if shard.total > 1:
        names = [a.name for a in shard.select(config.accounts, lambda a: a.name)]
        per_shard = shard_limits(budget, shard.total).per_minute
        lines.append(
            f"shard {shard}: budget B / {shard.total} = {per_shard:g} weight/min per "
            f"egress IP; {len(names)} of {len(config.accounts)} accounts: "
            + (", ".join(names) or "none")
        )
    return "\n".join(lines)


def _extras(account: AccountConfig) -> str:
    """`  labels desk=a,team=b  thresholds uni_mmr_warning=2`, or nothing."""
    out = ""
    if account.labels:
        out += "  labels " + ",".join(f"{k}={v}" for k, v in sorted(account.labels.items()))
    thresholds = account.thresholds.given()
    if thresholds:
        out += "  thresholds " + ",".join(f"{k}={_num(v)}" for k, v in thresholds.items())
    return out


def _prices_line(config: Config) -> str:
    prices = config.prices
    if not prices.enabled:
        return "prices: off (no binance_pm_asset_price_usd; USD rules and panels stay empty)"
    weight = WEIGHTS["ticker_price"]
    per_minute = weight * 60 / prices.interval_seconds
    return (
        f"prices: GET {prices.base_url}/api/v3/ticker/price every"
        f" {_num(prices.interval_seconds)} s = {weight} x {_num(60 / prices.interval_seconds)}"
        f" = {_num(per_minute)} weight/min of the spot API's own"
        f" {SPOT_IP_WEIGHT_LIMIT_PER_MINUTE}/min (egress {prices.route.label});"
        f" 1 USD each: {', '.join(prices.usd_assets)}"
    )


def _time_line(config: Config) -> str:
    """Where Binance's clock is read (the PM API documents no time endpoint)."""
    fallback = f", else GET {config.prices.base_url}/api/v3/time" if config.prices.enabled else ""
    return (
        f"time: GET {config.binance.futures_url}/fapi/v1/time{fallback}, at start and after"
        " a -1021, through each account's egress; weight 1, on those hosts' own pools"
    )


def _num(value: float) -> str:
    return f"{value:.6g}" if value != int(value) else str(int(value))
