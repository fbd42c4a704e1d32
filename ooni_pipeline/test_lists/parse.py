"""Reading and strictly validating the CitizenLab test lists (pure functions).

The lists live in ``lists/<cc>.csv`` (a two-letter country code) and
``lists/global.csv`` (stored as ``ZZ``); every other file is skipped. A URL is kept
only if it is an http(s) URL (or has no scheme) with a valid domain name or IPv4
address, an optional port and path, and none of CR, LF, tab, backslash or
whitespace. Rejected rows are counted by reason, never dropped silently.
"""

from __future__ import annotations

import csv
import io
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

EXPECTED_HEADER = ["url", "category_code", "category_description", "date_added", "source", "notes"]
GLOBAL_CC = "ZZ"
MAX_EXAMPLES_PER_REASON = 3

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
_TLD = re.compile(r"^(?:[A-Za-z]{2,63}|xn--[A-Za-z0-9-]{1,59})$")
_IPV4 = re.compile(r"^\d{1,3}(?:\.\d{1,3}){3}$")
_BAD_CHARS = re.compile(r"[\r\n\t\\\s]")
_COUNTRY_FILE = re.compile(r"^[a-z]{2}$")


class TestListFormatError(ValueError):
    """A list file cannot be read at all (wrong header, bad encoding)."""


class InvalidURL(ValueError):
    """A URL failed validation; ``reason`` is a short stable label."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _valid_hostname(host: str) -> bool:
    if _IPV4.match(host):
        return all(
            0 <= int(octet) <= 255 and (octet == "0" or not octet.startswith("0"))
            for octet in host.split(".")
        )
    name = host[:-1] if host.endswith(".") else host
    if not name or len(name) > 253:
        return False
    labels = name.split(".")
    return (
        len(labels) >= 2
        and all(_LABEL.match(label) for label in labels)
        and bool(_TLD.match(labels[-1]))
    )


def url_domain(url: str) -> str:
    """The domain (or IPv4 address) of a test-list URL; raises ``InvalidURL``."""
    if not url:
        raise InvalidURL("empty_url")
    if _BAD_CHARS.search(url):
        raise InvalidURL("bad_characters")
    rest = url
    scheme = _SCHEME.match(url)
    if scheme:
        if scheme.group(1).lower() not in ("http", "https"):
            raise InvalidURL("bad_scheme")
        rest = url[scheme.end() :]
    split = re.search(r"[/?#]", rest)
    authority, path = (rest[: split.start()], rest[split.start() :]) if split else (rest, "")
    if path.startswith("#"):
        raise InvalidURL("bad_path")
    if "@" in authority:
        raise InvalidURL("bad_host")  # userinfo has no place in a test list
    host, _, port = authority.partition(":")
    if ":" in authority:
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise InvalidURL("bad_port")
    if not _valid_hostname(host):
        raise InvalidURL("bad_host")
    return host


@dataclass(frozen=True)
class TestListRow:
    domain: str
    url: str
    cc: str
    category_code: str


@dataclass
class ParsedLists:
    rows: list[TestListRow] = field(default_factory=list)
    files: int = 0
    skipped_files: list[str] = field(default_factory=list)
    duplicates: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    def reject(self, reason: str, where: str, url: str) -> None:
        self.rejected[reason] += 1
        if self.rejected[reason] <= MAX_EXAMPLES_PER_REASON:
            self.examples.append(f"{where}: {reason}: {url[:200]!r}")


def country_of(path: Path) -> str | None:
    """``IT`` for ``it.csv``, ``ZZ`` for ``global.csv``, None for files to skip."""
    if path.suffix != ".csv":
        return None
    if path.stem == "global":
        return GLOBAL_CC
    return path.stem.upper() if _COUNTRY_FILE.match(path.stem) else None


def parse_list_file(
    text: str, cc: str, name: str, into: ParsedLists, seen: set[TestListRow]
) -> None:
    """Add the valid rows of one list file to ``into``; count the rest."""
    reader = csv.reader(io.StringIO(text.lstrip("\ufeff"), newline=""))
    header = next(reader, None)
    if header is None or [h.strip() for h in header] != EXPECTED_HEADER:
        raise TestListFormatError(
            f"{name}: header is {header!r}, expected {','.join(EXPECTED_HEADER)}"
        )
    for record in reader:
        line = reader.line_num
        if not any(cell.strip() for cell in record):
            continue  # blank line
        where = f"{name}:{line}"
        if len(record) != len(EXPECTED_HEADER):
            into.reject("wrong_field_count", where, ",".join(record))
            continue
        url, category_code = record[0], record[1].strip()
        try:
            domain = url_domain(url)
        except InvalidURL as exc:
            into.reject(exc.reason, where, url)
            continue
        if not category_code:
            into.reject("missing_category_code", where, url)
            continue
        row = TestListRow(domain=domain, url=url, cc=cc, category_code=category_code)
        if row in seen:
            into.duplicates += 1
            continue
        seen.add(row)
        into.rows.append(row)


def read_lists(checkout: Path) -> ParsedLists:
    """Every valid row of ``lists/*.csv`` in a test-lists checkout."""
    lists_dir = checkout / "lists"
    if not lists_dir.is_dir():
        raise TestListFormatError(f"no lists/ directory in the test-lists repository at {checkout}")
    parsed = ParsedLists()
    seen: set[TestListRow] = set()
    for path in sorted(lists_dir.iterdir()):
        cc = country_of(path) if path.is_file() else None
        if cc is None:
            parsed.skipped_files.append(path.name)
            continue
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise TestListFormatError(f"lists/{path.name} is not UTF-8: {exc}") from exc
        parse_list_file(text, cc, f"lists/{path.name}", parsed, seen)
        parsed.files += 1
    return parsed
