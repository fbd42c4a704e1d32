"""Streaming parse of the AS-organisation map, in bounded memory (pure functions).

The source is one JSON object ``{"<asn>": [[org_name, cc, "YYYYMMDD", aut_name,
source], ...], ...}`` of about 100k ASNs. Instead of ``json.load`` (the raw body, the
parsed dict and the rows all in memory at once), ``iter_asn_histories`` reads the
top-level object one member at a time from a stream of byte chunks, with the C JSON
scanner doing the work on each small value; ``arrow_batches`` turns them into
validated Arrow tables of a bounded size, ready to insert.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import date

import pyarrow as pa
import pyarrow.compute as pc

MAX_ASN = 2**32 - 1
ENTRY_FIELDS = ("org_name", "cc", "changed", "aut_name", "source")
WHITESPACE = " \t\r\n"
MAX_VALUE_CHARS = 4 << 20  # one ASN's history is a few KB


class AsnMetaError(ValueError):
    """The map is malformed; the message names the ASN and the field."""


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
        if self.pos > 1 << 20:  # drop what was consumed
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
            while self.pos < len(self.text) and self.text[self.pos] in WHITESPACE:
                self.pos += 1
            if self.pos < len(self.text):
                return self.text[self.pos]
            if not self.more():
                return ""

    def expect(self, chars: str, what: str) -> str:
        char = self.skip_ws()
        if not char or char not in chars:
            found = (
                repr(self.text[self.pos : self.pos + 40])
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


def iter_asn_histories(
    chunks: Iterable[bytes], stats: ParseStats | None = None
) -> Iterator[tuple[str, object]]:
    """(asn key, history value) for each member of the top-level JSON object."""
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
            key = buffer.value(decoder, "an ASN key")
            if not isinstance(key, str):
                raise AsnMetaError(f"expected an ASN string key, found {key!r}")
            buffer.expect(":", f"':' after ASN {key}")
            yield key, buffer.value(decoder, f"ASN {key}")
            if buffer.expect(",}", f"',' or '}}' after ASN {key}") == "}":
                break
    if buffer.skip_ws():
        raise AsnMetaError(
            f"unexpected data after the AS map: {buffer.text[buffer.pos : buffer.pos + 40]!r}"
        )
    if stats is not None:
        stats.bytes_read = buffer.bytes_read


@dataclass
class ParseStats:
    bytes_read: int = 0
    asns: int = 0
    rows: int = 0
    newest_changed: date | None = None
    sources: dict[str, int] = field(default_factory=dict)


def _asn(key: str) -> int:
    if not key.isdigit() or int(key) > MAX_ASN:
        raise AsnMetaError(f"ASN {key!r}: not an integer in 0..{MAX_ASN}")
    return int(key)


def arrow_batches(
    histories: Iterable[tuple[str, object]], stats: ParseStats, batch_rows: int = 50_000
) -> Iterator[pa.Table]:
    """Validated rows (asn, org_name, cc, changed, aut_name, source) in Arrow tables."""
    columns: dict[str, list] = {"asn": [], **{name: [] for name in ENTRY_FIELDS}}
    where: list[str] = []  # the ASN of each row, to name it if its date is bad
    for key, history in histories:
        asn = _asn(key)
        if not isinstance(history, list):
            raise AsnMetaError(
                f"ASN {key}: history is {type(history).__name__}, expected a list of entries"
            )
        stats.asns += 1
        for number, entry in enumerate(history):
            if not isinstance(entry, list) or len(entry) != 5:
                size = len(entry) if isinstance(entry, list) else type(entry).__name__
                raise AsnMetaError(
                    f"ASN {key}: entry {number} has {size} fields, expected 5 {ENTRY_FIELDS}"
                )
            for name, value in zip(ENTRY_FIELDS, entry, strict=True):
                if not isinstance(value, str):
                    raise AsnMetaError(
                        f"ASN {key}: entry {number}: field {name!r} is {value!r}, expected a string"
                    )
                columns[name].append(value)
            columns["asn"].append(asn)
            where.append(key)
        if len(where) >= batch_rows:
            yield _table(columns, where, stats)
            columns = {name: [] for name in columns}
            where = []
    if where:
        yield _table(columns, where, stats)


def _table(columns: dict[str, list], where: list[str], stats: ParseStats) -> pa.Table:
    changed_text = pa.array(columns["changed"], pa.string())
    try:
        parsed = pc.strptime(changed_text, format="%Y%m%d", unit="s", error_is_null=False)
        # strptime rolls impossible dates over (20230230 -> 2023-03-02): demand a round trip.
        if not pc.all(pc.equal(pc.strftime(parsed, format="%Y%m%d"), changed_text)).as_py():
            raise ValueError("not a real date")
        changed = parsed.cast(pa.date32())
    except (pa.ArrowInvalid, ValueError):
        for key, text in zip(where, columns["changed"], strict=True):
            try:
                if len(text) != 8:
                    raise ValueError
                date(int(text[:4]), int(text[4:6]), int(text[6:]))
            except ValueError:
                raise AsnMetaError(
                    f"ASN {key}: field 'changed' is {text!r}, expected a date YYYYMMDD"
                ) from None
        raise
    table = pa.table(
        {
            "asn": pa.array(columns["asn"], pa.uint32()),
            "org_name": pa.array(columns["org_name"], pa.string()),
            "cc": pa.array(columns["cc"], pa.string()),
            "changed": changed,
            "aut_name": pa.array(columns["aut_name"], pa.string()),
            "source": pa.array(columns["source"], pa.string()),
        }
    )
    stats.rows += table.num_rows
    newest = pc.max(changed).as_py()
    if newest is not None and (stats.newest_changed is None or newest > stats.newest_changed):
        stats.newest_changed = newest
    return table
