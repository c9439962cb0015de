"""``--check-config`` output: what the exporter will do, without any secret."""

from __future__ import annotations

from collections import Counter

from exporter.budget import refresh_interval, refresh_weight
from exporter.config.models import Config


def summarize(config: Config) -> str:
    """A few lines: endpoint, budget arithmetic, accounts with key type and egress."""
    budget = config.budget
    weight = refresh_weight(config.collect.account_info)
    limits = budget.limits
    per_minute = limits.per_minute
    high_water = budget.ip_high_water * budget.ip_weight_limit_per_minute
    assets = config.collect.assets
    lines = [
        f"binance: {config.binance.base_url} (recv_window {config.binance.recv_window_ms} ms,"
        f" timeout {_num(config.binance.timeout_seconds)} s)",
        f"collect: balance{' + account info' if config.collect.account_info else ''}"
        f" = {weight} weight per account refresh;"
        f" assets {', '.join(assets.include) or 'all'}"
        + (f" except {', '.join(assets.exclude)}" if assets.exclude else ""),
        f"budget: B = {budget.ip_weight_limit_per_minute} x {_num(budget.share)}"
        f" = {_num(per_minute)} weight/min per egress IP;"
        f" pause while the IP's used weight >= {_num(high_water)}"
        f" ({_num(budget.ip_high_water)} x {budget.ip_weight_limit_per_minute})",
    ]
    for egress, count in Counter(a.route.label for a in config.accounts).items():
        by_budget = refresh_interval(count, weight, limits, 0.0)
        interval = refresh_interval(count, weight, limits, budget.min_interval_seconds)
        binding = "budget" if by_budget >= budget.min_interval_seconds else "min_interval"
        lines.append(
            f"refresh ({egress}): {count} account(s) x {weight} / {_num(per_minute)} per min"
            f" = {_num(by_budget)} s by budget, min_interval {_num(budget.min_interval_seconds)}"
            f" s -> each account every {_num(interval)} s ({binding})"
        )
    lines.append(f"accounts ({len(config.accounts)}):")
    width = max(len(a.name) for a in config.accounts)
    lines += [
        f"  {a.name:<{width}}  {a.key_type:<7}  egress={a.route.label}" for a in config.accounts
    ]
    return "\n".join(lines)


def _num(value: float) -> str:
    return f"{value:.6g}" if value != int(value) else str(int(value))
