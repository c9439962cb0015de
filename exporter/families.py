"""A gauge family of the snapshot: its name, HELP, labels and one account's samples.

A leaf (standard library and the snapshot types only): the collector modules declare
their families with it, and both renderers (collector.py through prometheus_client,
exposition.py straight to text) read them through it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from exporter.snapshot import AccountSnapshot

Sample = tuple[tuple[str, ...], float]


def help_text(what: str, field: str, endpoint: str) -> str:
    """A HELP that names the API field and endpoint a value comes from."""
    return f"{what} ({field} of {endpoint})."


@dataclass(frozen=True, slots=True)
class Family:
    """One gauge family of the snapshot: its name, HELP, labels and one account's samples.

    `samples(account)` gives the label values after `account` and the value of each
    sample; both renderers (prometheus_client's in collector.py, the cached one in
    exposition.py) read the families through it, so they cannot disagree.
    """

    name: str
    help: str
    labels: tuple[str, ...]
    samples: Callable[[AccountSnapshot], Iterable[Sample]]
    #: each sample also carries the account's own labels (`AccountSnapshot.meta.labels`)
    own_labels: bool = False

    def label_pairs(
        self, account: AccountSnapshot, values: tuple[str, ...]
    ) -> list[tuple[str, str]]:
        """A sample's labels, name and value, sorted by name as prometheus_client writes them."""
        pairs = [("account", account.name), *zip(self.labels[1:], values, strict=True)]
        if self.own_labels:
            return sorted([*pairs, *account.meta.labels])
        return pairs

    def __post_init__(self) -> None:
        # prometheus_client sorts labels by name; keeping them sorted here keeps the
        # hand-written exposition identical to its output.
        assert self.labels[0] == "account"
        assert list(self.labels) == sorted(self.labels)
