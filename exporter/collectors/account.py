"""GET /papi/v1/account: one gauge per account and amount field (fields.ACCOUNT), the
account status, and when Binance updated it. Config switch: `collect.account_info`.

Its part is `AccountSnapshot.info`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import replace

from exporter import fields
from exporter.binance.models import parse_account
from exporter.collectors.registry import Collector, Request, register
from exporter.collectors.stored import saved_object, saved_optional_label, saved_time, saved_values
from exporter.families import Family, Sample, help_text
from exporter.snapshot import AccountInfo, AccountSnapshot
from exporter.weights import WEIGHTS

PATH = "/papi/v1/account"


def _field(field: str) -> Callable[[AccountSnapshot], Iterable[Sample]]:
    def samples(account: AccountSnapshot) -> Iterable[Sample]:
        value = None if account.info is None else account.info.values.get(field)
        if value is not None:
            yield (), value

    return samples


def _status(account: AccountSnapshot) -> Iterable[Sample]:
    status = None if account.info is None else account.info.status
    if status is None:
        return
    known: tuple[str, ...] = fields.ACCOUNT_STATUSES
    if status not in known:
        known = (*known, status)
    for name in known:
        yield (name,), 1.0 if name == status else 0.0


def _time(account: AccountSnapshot) -> Iterable[Sample]:
    if account.info is not None and account.info.update_time is not None:
        yield (), account.info.update_time


FAMILIES: tuple[Family, ...] = (
    *(
        Family(
            f.metric,
            help_text(f.help, f.api, fields.ACCOUNT_ENDPOINT),
            ("account",),
            _field(f.api),
        )
        for f in fields.ACCOUNT
    ),
    Family(
        "binance_pm_account_status",
        help_text(
            "1 for the account's current status, 0 for every other known status",
            "accountStatus",
            fields.ACCOUNT_ENDPOINT,
        ),
        ("account", "status"),
        _status,
    ),
    Family(
        "binance_pm_account_update_timestamp_seconds",
        help_text(
            "When Binance last updated the account", "updateTime / 1000", fields.ACCOUNT_ENDPOINT
        ),
        ("account",),
        _time,
    ),
)


def _get(account: AccountSnapshot) -> AccountInfo | None:
    return account.info


def _put(account: AccountSnapshot, part: AccountInfo | None) -> AccountSnapshot:
    return replace(account, info=part)


def _encode(part: AccountInfo) -> object:
    return {"values": dict(part.values), "status": part.status, "update_time": part.update_time}


def _decode(saved: object) -> AccountInfo:
    record = saved_object(saved)
    return AccountInfo(
        saved_values(record),
        saved_optional_label(record, "status", "a status"),
        saved_time(record),
    )


def _times(part: AccountInfo) -> Iterable[float | None]:
    return (part.update_time,)


COLLECTOR: Collector[AccountInfo] = register(
    Collector(
        name="account",
        switch="account_info",
        request=Request(PATH, WEIGHTS["account"]),
        parse=parse_account,
        families=FAMILIES,
        default=True,
        get=_get,
        put=_put,
        encode=_encode,
        decode=_decode,
        times=_times,
        stored_as="info",
    )
)
