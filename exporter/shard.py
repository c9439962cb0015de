"""Sharding: which accounts a replica polls, by rendezvous (highest random weight) hashing.

Every replica reads the same config and polls only the accounts whose highest
score, over all shard indexes, is its own. The score is SHA-256 of the shard
index and the account name, so every process, host and Python version agrees
(Python's own `hash()` is salted per process). The shards together cover every
account exactly once, and going from TOTAL to TOTAL + 1 shards moves only the
accounts the new shard wins: about 1 / (TOTAL + 1) of them.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

#: INDEX/TOTAL; INDEX may be a name ending in -ORDINAL (a StatefulSet pod's name)
_SHARD = re.compile(
    r"(?:(?P<index>\d+)|(?P<name>[A-Za-z0-9][A-Za-z0-9_.-]*-(?P<ordinal>\d+)))/(?P<total>\d+)"
)
MAX_SHARDS = 1024

T = TypeVar("T")


class ShardError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Shard:
    """This replica's place: shard `index` of `total` (0-based)."""

    index: int = 0
    total: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.total <= MAX_SHARDS:
            raise ShardError(f"TOTAL must be 1..{MAX_SHARDS}, got {self.total}")
        if not 0 <= self.index < self.total:
            raise ShardError(f"INDEX must be 0..{self.total - 1}, got {self.index}")

    def owns(self, account: str) -> bool:
        return owner(account, self.total) == self.index

    def select(self, items: Iterable[T], name_of: Callable[[T], str]) -> list[T]:
        """The items (accounts) this shard polls, in their order."""
        return [item for item in items if self.owns(name_of(item))]

    def __str__(self) -> str:
        return f"{self.index}/{self.total}"


def score(account: str, index: int) -> int:
    digest = hashlib.sha256(f"{index}\x00{account}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def owner(account: str, total: int) -> int:
    """The shard index (0..total-1) that polls `account`."""
    return max(range(total), key=lambda index: score(account, index))


def assign(accounts: Sequence[str], total: int) -> dict[str, int]:
    return {account: owner(account, total) for account in accounts}


def parse_shard(text: str) -> Shard:
    """`INDEX/TOTAL` (`2/5`), or `NAME-ORDINAL/TOTAL` (`binance-pm-exporter-2/5`).

    The second form lets a StatefulSet pass `$(POD_NAME)/5`: INDEX is the number
    after the name's last dash, which is the pod's ordinal.
    """
    match = _SHARD.fullmatch(text.strip())
    if match is None:
        raise ShardError(f"expected INDEX/TOTAL or NAME-ORDINAL/TOTAL, got {text!r}")
    index = match.group("index") or match.group("ordinal")
    return Shard(int(index), int(match.group("total")))


#: no sharding: one replica polls every account
WHOLE = Shard()
