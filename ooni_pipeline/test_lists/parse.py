"""Reading and strictly validating the CitizenLab test lists (pure functions).

The lists live in ``lists/<cc>.csv`` (a two-letter country code) and
``lists/global.csv`` (stored as ``ZZ``); every other file is skipped. A URL is kept
only if it is an http(s) URL (or has no scheme) with a valid domain name or IPv4
address, an optional port and path, and none of CR, LF, tab, backslash or
whitespace. Rejected rows are counted by reason, never dropped silently.

The repository is untrusted: a list file must be a regular file directly in the
checkout's real ``lists/`` directory (a symlink could point at the environment or
``/etc/passwd``), and errors name the file and line with a short escaped excerpt
at most, never the file's content.
"""

from __future__ import annotations

import csv
import io
import os
import re
import stat
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

from ooni_pipeline.untrusted import excerpt

EXPECTED_HEADER = ["url", "category_code", "category_description", "date_added", "source", "notes"]
GLOBAL_CC = "ZZ"
MAX_EXAMPLES_PER_REASON = 3
EXAMPLE_CHARS = 100

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
_TLD = re.compile(r"^(?:[A-Za-z]{2,63}|xn--[A-Za-z0-9-]{1,59})$")
_IPV4 = re.compile(r"^\d{1,3}(?:\.\d{1,3}){3}$")
_BAD_CHARS = re.compile(r"[\r\n\t\\\s]")
_COUNTRY_FILE = re.compile(r"^[a-z]{2}$")


class TestListFormatError(ValueError):
    """A list file cannot be read at all (not a regular file, wrong header, bad encoding)."""


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
            self.examples.append(f"{where}: {reason}: {excerpt(url, EXAMPLE_CHARS)}")


def country_of(path: Path) -> str | None:
    """``IT`` for ``it.csv``, ``ZZ`` for ``global.csv``, None for files to skip."""
    if path.suffix != ".csv":
        return None
    if path.stem == "global":
        return GLOBAL_CC
    return path.stem.upper() if _COUNTRY_FILE.fullmatch(path.stem) else None


def parse_list_file(
    text: str, cc: str, name: str, into: ParsedLists, seen: set[TestListRow]
) -> None:
    """Add the valid rows of one list file to ``into``; count the rest."""
    reader = csv.reader(io.StringIO(text.lstrip("\ufeff"), newline=""))
    try:
        header = next(reader, None)
        if header is None or [h.strip() for h in header] != EXPECTED_HEADER:
            found = "missing" if header is None else excerpt(",".join(header))
            raise TestListFormatError(
                f"{name}:1: header is {found}, expected {','.join(EXPECTED_HEADER)}"
            )
        for record in reader:
            if any(cell.strip() for cell in record):  # skip blank lines
                _add_row(record, cc, f"{name}:{reader.line_num}", into, seen)
    except csv.Error as exc:  # its message holds no content
        raise TestListFormatError(f"{name}:{reader.line_num}: malformed CSV ({exc})") from None


def _add_row(
    record: list[str], cc: str, where: str, into: ParsedLists, seen: set[TestListRow]
) -> None:
    if len(record) != len(EXPECTED_HEADER):
        into.reject("wrong_field_count", where, ",".join(record))
        return
    url, category_code = record[0], record[1].strip()
    try:
        domain = url_domain(url)
    except InvalidURL as exc:
        into.reject(exc.reason, where, url)
        return
    if not category_code:
        into.reject("missing_category_code", where, url)
        return
    row = TestListRow(domain=domain, url=url, cc=cc, category_code=category_code)
    if row in seen:
        into.duplicates += 1
        return
    seen.add(row)
    into.rows.append(row)


def _read_regular_file(path: Path, name: str) -> bytes:
    """The bytes of ``path`` if it is a regular file; never through a symlink.

    ``O_NOFOLLOW`` refuses a symlink and ``fstat`` checks the file actually opened,
    so nothing can swap the file between the check and the read.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        raise TestListFormatError(f"{name}: not a regular file (a symlink?); refused") from None
    with os.fdopen(fd, "rb") as file:
        if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
            raise TestListFormatError(f"{name}: not a regular file; refused")
        return file.read()


def read_lists(checkout: Path, symlinks: Collection[str] = ()) -> ParsedLists:
    """Every valid row of ``lists/*.csv`` in a test-lists checkout.

    ``symlinks`` are the paths git records as symlinks: checked out as plain files
    (``core.symlinks=false``) holding their target, they are refused by name.
    """
    lists_dir = checkout.resolve() / "lists"
    try:
        is_dir = stat.S_ISDIR(lists_dir.lstat().st_mode)
    except FileNotFoundError:
        raise TestListFormatError("no lists/ directory in the test-lists repository") from None
    if not is_dir or "lists" in symlinks:
        raise TestListFormatError("lists is not a directory (a symlink?); refused")
    parsed = ParsedLists()
    seen: set[TestListRow] = set()
    for path in sorted(lists_dir.iterdir()):
        cc = country_of(path)
        if cc is None:
            parsed.skipped_files.append(path.name)
            continue
        name = f"lists/{path.name}"
        if name in symlinks:
            raise TestListFormatError(f"{name}: a symlink in the repository; refused")
        data = _read_regular_file(path, name)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = data.count(b"\n", 0, exc.start) + 1
            raise TestListFormatError(
                f"{name}:{line}: not UTF-8 (byte {data[exc.start]:#04x})"
            ) from None
        parse_list_file(text, cc, name, parsed, seen)
        parsed.files += 1
    return parsed
