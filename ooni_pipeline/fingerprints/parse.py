"""Strict parsing of the blocking-fingerprint CSVs (pure functions).

The fastpath confirms blocking by matching these fingerprints, so a wrong row
mislabels measurements worldwide: any bad row fails the whole file, with the
file, line and field named, and a short escaped excerpt of the value at most.
"""

from __future__ import annotations

import csv
import io
import re
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ooni_pipeline.clickhouse.schema import PATTERN_TYPES
from ooni_pipeline.untrusted import excerpt

if TYPE_CHECKING:  # imported where a file is parsed: the code location loads without it
    import pyarrow as pa

HEADER = (
    "name",
    "scope",
    "other_names",
    "location_found",
    "pattern_type",
    "pattern",
    "confidence_no_fp",
    "expected_countries",
    "source",
    "exp_url",
    "notes",
)


class FingerprintError(ValueError):
    """The file is not a valid fingerprint CSV; the message says where and why."""


@dataclass
class ParsedFingerprints:
    table: pa.Table
    per_scope: Counter[str]
    per_pattern_type: Counter[str]


def _looks_like(text: str) -> str | None:
    start = text.lstrip()[:200].lower()
    if start.startswith(("<!doctype", "<html", "<?xml", "<")):
        return "HTML"
    if start.startswith(("{", "[")):
        return "JSON"
    return None


def parse_fingerprints(body: bytes, source: str, scopes: tuple[str, ...]) -> ParsedFingerprints:
    """Parse and validate a fingerprint CSV; raise ``FingerprintError`` on the first bad row."""
    import pyarrow as pa

    try:
        text = body.decode("utf-8").lstrip("\ufeff")
    except UnicodeDecodeError as exc:
        raise FingerprintError(f"{source}: not UTF-8 ({exc})") from None
    kind = _looks_like(text)
    if kind:
        raise FingerprintError(
            f"{source}: the body is {kind}, not CSV (starts with {excerpt(text.lstrip())})"
        )
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = next(reader, None)
        if header is None or tuple(h.strip() for h in header) != HEADER:
            found = "missing" if header is None else excerpt(",".join(header))
            raise FingerprintError(
                f"{source}: line 1: header is {found}, expected {','.join(HEADER)}"
            )
        columns: dict[str, list] = {name: [] for name in HEADER}
        seen: dict[str, int] = {}
        for record in reader:
            line = reader.line_num
            if not any(cell.strip() for cell in record):
                continue
            row = _validate_row(record, f"{source}: line {line}", scopes)
            if row["name"] in seen:
                raise FingerprintError(
                    f"{source}: line {line}: field 'name': {excerpt(row['name'])} duplicates line {seen[row['name']]}"
                )
            seen[row["name"]] = line
            for name in HEADER:
                columns[name].append(row[name])
    except csv.Error as exc:
        raise FingerprintError(f"{source}: line {reader.line_num}: malformed CSV ({exc})") from None
    table = pa.table(
        {
            name: pa.array(values, pa.uint8() if name == "confidence_no_fp" else pa.string())
            for name, values in columns.items()
        }
    )
    return ParsedFingerprints(table, Counter(columns["scope"]), Counter(columns["pattern_type"]))


def _validate_row(record: list[str], where: str, scopes: tuple[str, ...]) -> dict:
    if len(record) != len(HEADER):
        raise FingerprintError(f"{where}: {len(record)} fields, expected {len(HEADER)}")
    row = dict(zip(HEADER, record, strict=True))
    if not row["name"].strip():
        raise FingerprintError(f"{where}: field 'name' is empty")
    if row["scope"] not in scopes:
        raise FingerprintError(
            f"{where}: field 'scope': {excerpt(row['scope'])} is not one of {', '.join(scopes)}"
        )
    if row["pattern_type"] not in PATTERN_TYPES:
        raise FingerprintError(
            f"{where}: field 'pattern_type': {excerpt(row['pattern_type'])} is not one of {', '.join(PATTERN_TYPES)}"
        )
    if not row["pattern"]:
        raise FingerprintError(f"{where}: field 'pattern' is empty")
    if row["pattern_type"] == "regexp":
        try:
            re.compile(row["pattern"])
        except re.error as exc:
            raise FingerprintError(
                f"{where}: field 'pattern': invalid regexp {excerpt(row['pattern'])} ({exc})"
            ) from None
    confidence = row["confidence_no_fp"].strip()
    if not confidence.isdigit() or not 0 <= int(confidence) <= 255:
        raise FingerprintError(
            f"{where}: field 'confidence_no_fp': {excerpt(confidence)} is not an integer 0-255"
        )
    row["confidence_no_fp"] = int(confidence)
    return row
