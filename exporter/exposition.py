"""The snapshot's exposition, rendered once per snapshot change and served as cached bytes.

prometheus_client builds an object per sample on every scrape: with 200
accounts x 30 assets that is ~0.5 s per scrape. Here the snapshot families
(the enabled collectors', collector.families_of) are written straight to text, and
only for the accounts that changed, keyed by the `AccountSnapshot` object they came
from (snapshots are immutable, so a new object is the only way an account changes).
Accounts are kept in blocks of BLOCK_ACCOUNTS, their lines joined per family; a
change joins its block again. A scrape that finds the body of its format older than
the current `Snapshot.generation` assembles a new one from the blocks; every other
scrape serves the cached one.

Each variant (text or OpenMetrics, plain or gzip) is built under one lock, by
the `Prerenderer` when the snapshot changes or by the first scrape that needs
it; scrapes arriving meanwhile wait for it and take its result instead of
rendering again. A plain body is the tuple of its pieces (headers and block
columns), never joined. The gzip variant is a gzip header and one raw-deflate
segment per account and family, each ended by a full flush so that no segment
refers to another (joined: ~1 MB); per scrape, only the live self-metrics are
compressed and appended, with the CRC and size of the whole. The result is one
ordinary gzip member.

The lines are exactly prometheus_client's: label values escaped by its rules
(backslash, newline, double quote) and values formatted by its floatToGoString.
The live self-metrics that follow are written per scrape by `livetext`.
"""

from __future__ import annotations

import itertools
import struct
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from prometheus_client.utils import floatToGoString

from exporter.collector import DEFAULT_FAMILIES, Family
from exporter.snapshot import AccountSnapshot, Snapshot, SnapshotStore

Format = Literal["text", "openmetrics"]

#: the gzip member header: deflate, no flags, mtime 0, no extra flags, OS unknown
_GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"
_RAW_DEFLATE = -zlib.MAX_WBITS
#: a variant no scrape asked for this long is no longer built ahead (Prometheus scrapes
#: every 15-60 s; building bodies nobody reads would only take CPU from the pollers)
WANTED_SECONDS = 120.0
GZIP_LEVEL = 6
#: accounts whose lines are joined into one piece per family: sent as 5,400 pieces of
#: ~1 KB (200 accounts x 28 families), 5 MB took 5.5 ms on loopback against 3.5 ms as
#: one buffer; as 364 pieces of ~15 KB, 3.6 ms. A change joins its block again (~0.1 ms).
BLOCK_ACCOUNTS = 16
#: prometheus_client's float formatting (Go's, as Prometheus expects), typed
format_value: Callable[[float], str] = floatToGoString


def escape_label_value(value: str) -> str:
    """A label value as the exposition formats quote it (both use the same rules)."""
    if "\\" in value or "\n" in value or '"' in value:
        return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")
    return value


def escape_help(text: str, fmt: Format) -> str:
    """Help text as prometheus_client escapes it per format (OpenMetrics quotes `"` too)."""
    text = text.replace("\\", r"\\").replace("\n", r"\n")
    return text.replace('"', r"\"") if fmt == "openmetrics" else text


def help_line(family: Family, fmt: Format) -> str:
    """`# HELP` and `# TYPE` of a gauge family, escaped as prometheus_client does per format."""
    return f"# HELP {family.name} {escape_help(family.help, fmt)}\n# TYPE {family.name} gauge\n"


def render_lines(family: Family, account: AccountSnapshot) -> str:
    """The sample lines of one family for one account."""
    lines = []
    for values, value in family.samples(account):
        labels = ",".join(
            f'{name}="{escape_label_value(v)}"' for name, v in family.label_pairs(account, values)
        )
        lines.append(f"{family.name}{{{labels}}} {format_value(value)}\n")
    return "".join(lines)


Piece = bytes | memoryview


class _Fragment:
    """One account's lines, per family, and (lazily) their deflate segments. Once joined
    into a block, both are read back from the block (`home`): held once, not twice."""

    __slots__ = ("_deflated", "_lines", "home", "source")

    def __init__(self, source: AccountSnapshot, families: Sequence[Family]) -> None:
        self.source = source
        self._lines: tuple[bytes, ...] | None = tuple(
            render_lines(f, source).encode() for f in families
        )
        self._deflated: Sequence[Piece] | None = None
        #: the block holding this fragment's bytes, and its place there
        self.home: tuple[_Block, int] | None = None

    def lines(self) -> Sequence[Piece]:
        if self._lines is not None:
            return self._lines
        assert self.home is not None
        block, place = self.home
        return block.slices(block.columns, block.line_starts, place)

    def stored_deflate(self) -> Sequence[Piece] | None:
        """The deflate segments, if compressed already."""
        if self._deflated is not None:
            return self._deflated
        if self.home is not None:
            block, place = self.home
            if block.deflated is not None and block.deflate_starts is not None:
                return block.slices(block.deflated, block.deflate_starts, place)
        return None


def _deflate_segments(parts: Sequence[Piece]) -> tuple[bytes, ...]:
    """Each part as raw deflate ending in a full flush: segments that splice in any order."""
    compressor = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, _RAW_DEFLATE)
    return tuple(
        compressor.compress(part) + compressor.flush(zlib.Z_FULL_FLUSH) if part else b""
        for part in parts
    )


def _join(parts: list[Sequence[Piece]], families: int) -> tuple[tuple[bytes, ...], _Starts]:
    """Per family, the members' parts joined, and where each member starts (and ends)."""
    columns, starts = [], []
    for index in range(families):
        pieces = [part[index] for part in parts]
        starts.append(tuple(itertools.accumulate(map(len, pieces), initial=0)))
        columns.append(b"".join(pieces))
    return tuple(columns), tuple(starts)


_Starts = tuple[tuple[int, ...], ...]


class _Block:
    """BLOCK_ACCOUNTS accounts' lines joined per family (`columns`), and their deflate
    segments likewise (`deflated`, once the gzip variant is asked for)."""

    __slots__ = ("columns", "deflate_starts", "deflated", "line_starts", "size")

    def __init__(self, fragments: Sequence[_Fragment], families: int) -> None:
        self.size = len(fragments)
        lines = [fragment.lines() for fragment in fragments]
        stored = [fragment.stored_deflate() for fragment in fragments]
        self.columns, self.line_starts = _join(lines, families)
        self.deflated: tuple[bytes, ...] | None = None
        self.deflate_starts: _Starts | None = None
        if any(segments is not None for segments in stored):  # gzip is asked for
            self.deflated, self.deflate_starts = _join(
                [
                    s if s is not None else _deflate_segments(t)
                    for s, t in zip(stored, lines, strict=True)
                ],
                families,
            )
        for place, fragment in enumerate(fragments):
            fragment.home = (self, place)
            fragment._lines = fragment._deflated = None

    def holds(self, fragments: Sequence[_Fragment]) -> bool:
        """Whether this block is `fragments`, in that order."""
        return self.size == len(fragments) and all(
            fragment.home is not None and fragment.home[0] is self and fragment.home[1] == place
            for place, fragment in enumerate(fragments)
        )

    def deflate(self, fragments: Sequence[_Fragment]) -> tuple[bytes, ...]:
        """The deflate segments joined per family (compressed now if never asked for)."""
        if self.deflated is None:
            self.deflated, self.deflate_starts = _join(
                [_deflate_segments(fragment.lines()) for fragment in fragments],
                len(self.columns),
            )
        return self.deflated

    @staticmethod
    def slices(columns: tuple[bytes, ...], starts: _Starts, place: int) -> list[memoryview]:
        return [
            memoryview(column)[start[place] : start[place + 1]]
            for column, start in zip(columns, starts, strict=True)
        ]


#: the blocks of a snapshot, each with its members
_Blocks = list[tuple[_Block, list[_Fragment]]]


@dataclass(frozen=True, slots=True)
class GzipPrefix:
    """A gzip member without its end: the header and the deflate segments (`data`, in
    order) of `size` bytes of text whose CRC-32 is `crc`."""

    data: tuple[bytes, ...]
    crc: int
    size: int

    def finish(self, tail: bytes) -> list[bytes]:
        """The complete member, with `tail` appended: chunks to send in order."""
        compressor = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, _RAW_DEFLATE)
        end = compressor.compress(tail) + compressor.flush()
        crc = zlib.crc32(tail, self.crc)
        size = (self.size + len(tail)) & 0xFFFFFFFF
        return [*self.data, end + struct.pack("<II", crc, size)]


@dataclass(frozen=True, slots=True)
class _Body:
    generation: int
    content: tuple[bytes, ...] | GzipPrefix


class CachedExposition:
    """The current snapshot's families in each format, rendered once per generation.

    A body is a list of the cached pieces (a header, then each account's lines of the
    family), never joined: served as they are (exporter.http writes them with one
    `sendmsg` per 1024), they cost no 5 MB copy per change, and no memory beyond the
    fragments. When the two formats' headers are the same bytes (no help text with a
    double quote), they share their bodies too: only the live tail differs."""

    def __init__(self, store: SnapshotStore, families: Sequence[Family] = DEFAULT_FAMILIES) -> None:
        self._store = store
        self._lock = threading.Lock()
        self._set(families)
        #: the variants scrapes asked for, and when last: `render_changed()` builds those
        #: asked for within WANTED_SECONDS ahead of the next scrape
        self._wanted: dict[tuple[Format, bool], float] = {}
        #: bodies built so far, for tests and benchmarks
        self.renders = 0

    @property
    def families(self) -> tuple[Family, ...]:
        """The families rendered: the reference renderer reads the same ones."""
        return self._families

    def set_families(self, families: Sequence[Family]) -> None:
        """Render `families` from now on (a reload turned a collector on or off): every
        account and body is rendered again at the next scrape."""
        with self._lock:
            if tuple(families) != self._families:
                self._set(families)

    def _set(self, families: Sequence[Family]) -> None:
        self._families = tuple(families)
        self._headers = {
            fmt: tuple(help_line(f, fmt).encode() for f in self._families)
            for fmt in ("text", "openmetrics")
        }
        self._header_segments = {
            fmt: _deflate_segments(headers) for fmt, headers in self._headers.items()
        }
        #: the format whose bodies serve each format (OpenMetrics takes the text's when
        #: their headers are equal)
        self._same: dict[Format, Format] = {
            "text": "text",
            "openmetrics": (
                "text" if self._headers["text"] == self._headers["openmetrics"] else "openmetrics"
            ),
        }
        self._fragments: dict[str, _Fragment] = {}
        self._blocks: list[_Block] = []
        self._bodies: dict[tuple[Format, bool], _Body] = {}

    def chunks(self, fmt: Format) -> tuple[bytes, ...]:
        """The snapshot's families, uncompressed, in pieces to send in order (no `# EOF`:
        the live part ends it)."""
        content = self._body(fmt, False)
        assert isinstance(content, tuple)
        return content

    def text(self, fmt: Format) -> bytes:
        """`chunks(fmt)` joined."""
        return b"".join(self.chunks(fmt))

    def gzip(self, fmt: Format) -> GzipPrefix:
        """The snapshot's families as the start of a gzip member; `finish()` it per scrape."""
        content = self._body(fmt, True)
        assert isinstance(content, GzipPrefix)
        return content

    def _body(
        self, fmt: Format, gzip: bool, *, asked: bool = True
    ) -> tuple[bytes, ...] | GzipPrefix:
        wanted = self._store.current.generation
        fmt = self._same[fmt]
        if asked:
            self._wanted[(fmt, gzip)] = time.monotonic()
        body = self._bodies.get((fmt, gzip))
        if body is not None and body.generation >= wanted:
            return body.content
        with self._lock:
            # Whoever waited here while another scrape rendered takes its result.
            body = self._bodies.get((fmt, gzip))
            if body is not None and body.generation >= wanted:
                return body.content
            # Bodies of older generations would be rebuilt before use anyway: free them
            # first, so that an old and a new body of a variant are not held at once.
            self._bodies = {
                key: old for key, old in self._bodies.items() if old.generation >= wanted
            }
            snapshot = self._store.current
            fragments = self._update_fragments(snapshot)
            blocks = self._update_blocks(fragments)
            content = self._gzip(fmt, blocks) if gzip else self._plain(fmt, blocks)
            self._bodies[(fmt, gzip)] = _Body(snapshot.generation, content)
            self.renders += 1
            return content

    def render_changed(self) -> None:
        """Build, for the current snapshot, the variants scrapes asked for lately (only the
        accounts that changed are rendered and compressed, then the bodies are assembled),
        and render the changed accounts' text."""
        recent = time.monotonic() - WANTED_SECONDS
        for (fmt, gzip), asked in sorted(self._wanted.items()):
            if asked >= recent:
                self._body(fmt, gzip, asked=False)
        with self._lock:  # accounts that changed, for the variants not built ahead
            self._update_blocks(self._update_fragments(self._store.current))

    def _update_fragments(self, snapshot: Snapshot) -> list[_Fragment]:
        old = self._fragments
        fragments = {}
        for name, account in snapshot.accounts.items():
            fragment = old.get(name)
            if fragment is None or fragment.source is not account:
                fragment = _Fragment(account, self._families)
            fragments[name] = fragment
        self._fragments = fragments
        return list(fragments.values())

    def _update_blocks(self, fragments: list[_Fragment]) -> _Blocks:
        """The fragments in blocks of BLOCK_ACCOUNTS; only a block with a changed (or
        added, or removed) account is joined again."""
        old = self._blocks
        blocks = []
        for number, start in enumerate(range(0, len(fragments), BLOCK_ACCOUNTS)):
            members = fragments[start : start + BLOCK_ACCOUNTS]
            block = old[number] if number < len(old) else None
            if block is None or not block.holds(members):
                block = _Block(members, len(self._families))
            blocks.append((block, members))
        self._blocks = [block for block, _ in blocks]
        return blocks

    def _plain(self, fmt: Format, blocks: _Blocks) -> tuple[bytes, ...]:
        parts = []
        for index, header in enumerate(self._headers[fmt]):
            parts.append(header)
            parts.extend(column for block, _ in blocks if (column := block.columns[index]))
        return tuple(parts)

    def _gzip(self, fmt: Format, blocks: _Blocks) -> GzipPrefix:
        segments = [block.deflate(members) for block, members in blocks]
        data = [_GZIP_HEADER]
        crc = size = 0
        for index, header in enumerate(self._headers[fmt]):
            data.append(self._header_segments[fmt][index])
            data.extend(segment[index] for segment in segments)
            crc = zlib.crc32(header, crc)
            size += len(header)
            for block, _ in blocks:
                crc = zlib.crc32(block.columns[index], crc)
                size += len(block.columns[index])
        # one buffer (~1 MB): 364 pieces of ~3 KB would be slower to send
        return GzipPrefix((b"".join(data),), crc, size)


class Prerenderer:
    """Builds bodies ahead of scrapes: after each snapshot change (changes that come while
    it works are taken together), a thread of its own renders and compresses the accounts
    that changed and assembles the variants scraped within WANTED_SECONDS, so that a
    scrape finds its body ready. A scrape that comes meanwhile waits for that build and
    takes its result, as before: never an older generation."""

    def __init__(
        self,
        exposition: CachedExposition,
        store: SnapshotStore,
        *,
        on_start: Callable[[], None] = lambda: None,
    ) -> None:
        self._exposition = exposition
        self._store = store
        self._on_start = on_start
        self._changed = threading.Event()
        self._closed = False
        self._unsubscribe: Callable[[], None] | None = None
        self._thread = threading.Thread(target=self._run, name="exposition", daemon=True)

    def start(self) -> None:
        self._unsubscribe = self._store.subscribe(self._changed.set)
        self._thread.start()

    def _run(self) -> None:
        self._on_start()
        while True:
            self._changed.wait()
            if self._closed:
                return
            self._changed.clear()
            try:
                self._exposition.render_changed()
            except Exception:  # noqa: S112 - the scrape that needs it renders it and reports
                continue

    def close(self) -> None:
        self._closed = True
        if self._unsubscribe is not None:
            self._unsubscribe()
        self._changed.set()
