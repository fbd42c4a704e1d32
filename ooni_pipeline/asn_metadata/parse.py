"""Streaming parse of the AS-organisation map, in bounded memory (pure functions).

The source is one JSON object ``{"<asn>": [[org_name, cc, "YYYYMMDD", aut_name,
source], ...], ...}`` of about 100k ASNs. Instead of ``json.load`` (the raw body, the
parsed dict and the rows all in memory at once), ``iter_asn_histories`` reads the
top-level object one member at a time from a stream of byte chunks, with the C JSON
scanner doing the work on each small value; ``arrow_batches`` turns them into
validated Arrow tables of a bounded size, ready to insert. Errors name the ASN and
field with a short escaped excerpt of the value at most.
"""

from __future__ import annotations

import codecs
import gc
import json
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date
from itertools import chain

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ooni_pipeline.untrusted import EXCERPT_CHARS, excerpt

MAX_ASN = 2**32 - 1
ENTRY_FIELDS = ("org_name", "cc", "changed", "aut_name", "source")
_WHITESPACE = re.compile(r"[ \t\r\n]*")
_BOUNDARY = re.compile(r'\][ \t\r\n]*\]([ \t\r\n]*,[ \t\r\n]*)(?=")')
_BULK_CHARS = 1 << 16  # decode at most this much text at once (bounds memory)
_BOUNDARY_WINDOW = 1 << 15  # look for the last boundary in the tail of that slice
MAX_VALUE_CHARS = 4 << 20  # one ASN's history is a few KB


class AsnMetaError(ValueError):
    """The map is malformed; the message names the ASN and the field."""


def _asn_label(key: str) -> str:
    """An ASN key as written if it is one, else a short escaped excerpt of it."""
    return key if key.isascii() and key.isdigit() and len(key) <= 10 else excerpt(key)


@contextmanager
def cyclic_gc_relaxed(threshold: int = 20_000) -> Iterator[None]:
    """Run the cyclic garbage collector less often during a bulk parse.

    Parsed JSON holds no reference cycles (reference counting frees it), yet with
    the default threshold (700 allocations) the collector keeps rescanning the
    growing batch of entries: measured here, a third of the load time. Pausing it
    outright cost 33 MB of uncollected garbage from elsewhere; a high threshold
    keeps most of the speed and collects it. Restored on exit, whatever happens.
    """
    previous = gc.get_threshold()
    gc.set_threshold(threshold, *previous[1:])
    try:
        yield
    finally:
        gc.set_threshold(*previous)


class _Buffer:
    """Text decoded from byte chunks, consumed from the front."""

    def __init__(self, chunks: Iterable[bytes]):
        self._chunks = iter(chunks)
        self._decoder = codecs.getincrementaldecoder("utf-8-sig")()
        self.text = ""
        self.pos = 0
        self.eof = False
        self.bytes_read = 0

    def more(self) -> bool:
        """Read one more chunk; False at the end of the stream."""
        if self.eof:
            return False
        if self.pos > 1 << 18:  # drop what was consumed
            self.text, self.pos = self.text[self.pos :], 0
        try:
            chunk = next(self._chunks)
        except StopIteration:
            self.text += self._decoder.decode(b"", final=True)
            self.eof = True
            return False
        self.bytes_read += len(chunk)
        try:
            self.text += self._decoder.decode(chunk)
        except UnicodeDecodeError as exc:
            raise AsnMetaError(f"the body is not UTF-8 ({exc})") from None
        return True

    def skip_ws(self) -> str:
        """The next non-blank character ('' at the end), not consumed."""
        while True:
            self.pos = _WHITESPACE.match(self.text, self.pos).end()
            if self.pos < len(self.text):
                return self.text[self.pos]
            if not self.more():
                return ""

    def key(self, decoder: json.JSONDecoder) -> str:
        """A member name; plain ones (no escapes) without the full JSON decoder."""
        if self.skip_ws() == '"':
            end = self.text.find('"', self.pos + 1)
            if end != -1 and "\\" not in self.text[self.pos : end]:
                key = self.text[self.pos + 1 : end]
                self.pos = end + 1
                return key
        key = self.value(decoder, "an ASN key")
        if not isinstance(key, str):
            raise AsnMetaError(f"expected an ASN string key, found {excerpt(key)}")
        return key

    def members_in_bulk(self) -> list[tuple[str, object]] | None:
        """Every whole member from here to the last member boundary in the buffer,
        decoded by one ``json.loads``; None to fall back to one member at a time.

        A boundary is ``]]``, a comma and the next key's opening quote. A raw quote
        never occurs inside a JSON string (it is escaped), so a boundary found inside
        a string (one ending in ``]],``) makes the slice end inside that string:
        invalid JSON, hence the fallback, never a wrong result.
        """
        last = None
        for match in _BOUNDARY.finditer(
            self.text, max(self.pos, len(self.text) - _BOUNDARY_WINDOW)
        ):
            last = match
        if last is None:
            return None
        try:
            members = json.loads(
                "{" + self.text[self.pos : last.start(1)] + "}", object_pairs_hook=list
            )
        except json.JSONDecodeError:
            return None
        self.pos = last.end(1)
        return members

    def expect(self, chars: str, what: str) -> str:
        char = self.skip_ws()
        if not char or char not in chars:
            found = (
                excerpt(self.text[self.pos : self.pos + EXCERPT_CHARS])
                if char
                else "the end of the body (truncated?)"
            )
            raise AsnMetaError(
                f"expected {what} at character {self.bytes_read - len(self.text) + self.pos}, found {found}"
            )
        self.pos += 1
        return char

    def value(self, decoder: json.JSONDecoder, what: str):
        """Decode one JSON value, reading more chunks until it is complete."""
        self.skip_ws()
        while True:
            try:
                value, end = decoder.raw_decode(self.text, self.pos)
            except json.JSONDecodeError as exc:
                # A value cut at the end of the buffer fails like a malformed one:
                # read more, up to a bound no real history comes near.
                if not self.eof and len(self.text) - self.pos < MAX_VALUE_CHARS:
                    self.more()
                    continue
                if exc.pos >= len(self.text) - 1 or exc.msg.startswith("Unterminated"):
                    raise AsnMetaError(
                        f"{what}: the body ends inside a value (truncated JSON)"
                    ) from None
                raise AsnMetaError(f"{what}: invalid JSON ({exc.msg})") from None
            self.pos = end
            return value


def iter_member_runs(
    chunks: Iterable[bytes], stats: ParseStats | None = None
) -> Iterator[list[tuple[str, object]]]:
    """Runs of (asn key, history value) members of the top-level JSON object, in
    order: many members per run where they decode in bulk, one where they don't."""
    buffer = _Buffer(chunks)
    decoder = json.JSONDecoder()
    first = buffer.skip_ws()
    if first == "<":
        raise AsnMetaError("the body is HTML, not JSON (starts with '<')")
    buffer.expect("{", "'{' opening the AS map")
    if buffer.skip_ws() == "}":
        buffer.pos += 1
    else:
        while True:
            members = buffer.members_in_bulk()
            if members:
                yield members
                continue
            key = buffer.key(decoder)
            label = _asn_label(key)
            buffer.expect(":", f"':' after ASN {label}")
            yield [(key, buffer.value(decoder, f"ASN {label}"))]
            if buffer.expect(",}", f"',' or '}}' after ASN {label}") == "}":
                break
    if buffer.skip_ws():
        raise AsnMetaError(
            f"unexpected data after the AS map: {excerpt(buffer.text[buffer.pos : buffer.pos + EXCERPT_CHARS])}"
        )
    if stats is not None:
        stats.bytes_read = buffer.bytes_read


def iter_asn_histories(
    chunks: Iterable[bytes], stats: ParseStats | None = None
) -> Iterator[tuple[str, object]]:
    """(asn key, history value) for each member of the top-level JSON object."""
    for run in iter_member_runs(chunks, stats):
        yield from run


@dataclass
class ParseStats:
    bytes_read: int = 0
    asns: int = 0
    rows: int = 0
    newest_changed: date | None = None


def _asns(keys: list[str]) -> np.ndarray:
    """The ASN of each key; ASCII digits within 0..2^32-1, else an error naming it."""
    if all(map(str.isascii, keys)) and all(map(str.isdigit, keys)):
        values = np.array(list(map(int, keys)), dtype=np.int64) if keys else np.zeros(0, np.int64)
        if not len(values) or values.max() <= MAX_ASN:
            return values
    for key in keys:
        if not (key.isascii() and key.isdigit()) or int(key) > MAX_ASN:
            raise AsnMetaError(f"ASN {excerpt(key)}: not an integer in 0..{MAX_ASN}")
    raise AssertionError("unreachable")


def arrow_batches(
    runs: Iterable[list[tuple[str, object]]], stats: ParseStats, batch_rows: int = 50_000
) -> Iterator[pa.Table]:
    """Validated rows (asn, org_name, cc, changed, aut_name, source) in Arrow tables.

    Runs of members are checked whole in C (``map``, numpy, Arrow's converters);
    only a failing run or batch is walked in Python, to name the ASN and field.
    """
    batch = _Batch()
    for run in runs:
        batch.add_run(run, stats)
        if batch.rows >= batch_rows:
            yield batch.table(stats)
            batch = _Batch()
    if batch.rows:
        yield batch.table(stats)


class _Batch:
    def __init__(self) -> None:
        self.entries: list = []
        self.rows = 0
        self.asn_runs: list[np.ndarray] = []  # the ASN of each entry, per run
        self.owners: list[
            tuple[list[str], list[int]]
        ] = []  # (keys, entries per key), to name a bad one

    def add_run(self, run: list[tuple[str, object]], stats: ParseStats) -> None:
        keys = [key for key, _ in run]
        histories = [history for _, history in run]
        asns = _asns(keys)
        if not set(map(type, histories)) <= {list}:
            for key, history in run:
                if not isinstance(history, list):
                    raise AsnMetaError(
                        f"ASN {key}: history is {type(history).__name__}, expected a list of entries"
                    )
        lengths = list(map(len, histories))
        self.entries.extend(chain.from_iterable(histories))
        self.asn_runs.append(np.repeat(asns, lengths))
        self.owners.append((keys, lengths))
        self.rows += sum(lengths)
        stats.asns += len(keys)

    def _locate(self, row: int) -> tuple[str, int]:
        for keys, lengths in self.owners:
            for key, count in zip(keys, lengths, strict=True):
                if row < count:
                    return key, row
                row -= count
        raise IndexError(row)

    def _columns(self) -> list[pa.Array]:
        """The five string columns; entries are checked in C (``map``, Arrow's
        converter), and walked in Python only to name a bad one."""
        entries = self.entries
        if not (set(map(type, entries)) <= {list} and set(map(len, entries)) <= {5}):
            self._raise_first_bad_entry()
        try:
            columns = [pa.array([entry[i] for entry in entries], pa.string()) for i in range(5)]
        except (pa.ArrowTypeError, pa.ArrowInvalid):
            columns = None
        if columns is None or any(
            column.null_count for column in columns
        ):  # JSON null is no string
            self._raise_first_bad_entry()
        return columns

    def _raise_first_bad_entry(self) -> None:
        for row, entry in enumerate(self.entries):
            key, number = self._locate(row)
            if not isinstance(entry, list) or len(entry) != 5:
                size = len(entry) if isinstance(entry, list) else type(entry).__name__
                raise AsnMetaError(
                    f"ASN {key}: entry {number} has {size} fields, expected 5 {ENTRY_FIELDS}"
                )
            for name, value in zip(ENTRY_FIELDS, entry, strict=True):
                if not isinstance(value, str):
                    raise AsnMetaError(
                        f"ASN {key}: entry {number}: field {name!r} is {excerpt(value)}, expected a string"
                    )
        raise AsnMetaError("an entry could not be converted")  # Arrow refused what Python accepts

    def table(self, stats: ParseStats) -> pa.Table:
        columns = self._columns()
        changed = self._dates(columns[2])
        table = pa.table(
            {
                "asn": pa.array(np.concatenate(self.asn_runs), pa.uint32()),
                "org_name": columns[0],
                "cc": columns[1],
                "changed": changed,
                "aut_name": columns[3],
                "source": columns[4],
            }
        )
        stats.rows += table.num_rows
        newest = pc.max(changed).as_py()
        if newest is not None and (stats.newest_changed is None or newest > stats.newest_changed):
            stats.newest_changed = newest
        return table

    def _dates(self, text: pa.Array) -> pa.Array:
        try:
            parsed = pc.strptime(text, format="%Y%m%d", unit="s", error_is_null=False)
            # strptime rolls impossible days over (20230230 -> 2023-03-02) and takes
            # short years: demand 8 characters and the day as written.
            written_day = pc.cast(pc.utf8_slice_codeunits(text, 6, 8), pa.int64())
            valid = pc.and_(
                pc.equal(pc.utf8_length(text), 8), pc.equal(pc.day(parsed), written_day)
            )
            if pc.all(valid).as_py():
                return parsed.cast(pa.date32())
        except pa.ArrowInvalid:
            pass
        for row, value in enumerate(text.to_pylist()):
            try:
                if len(value) != 8 or not value.isdigit():
                    raise ValueError(value)
                date(int(value[:4]), int(value[4:6]), int(value[6:]))
            except ValueError:
                key, _ = self._locate(row)
                raise AsnMetaError(
                    f"ASN {key}: field 'changed' is {excerpt(value)}, expected a date YYYYMMDD"
                ) from None
        raise AsnMetaError("field 'changed': a date did not parse")  # unreachable in practice
