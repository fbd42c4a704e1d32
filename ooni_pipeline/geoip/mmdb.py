"""Downloading, unpacking and verifying an IP-to-country+ASN mmdb (no Dagster here).

A missing or corrupt file breaks measurement submission, so a download is only
ever installed after it is fully written, unpacked and verified, by an atomic
rename over the old file.
"""

from __future__ import annotations

import gzip
import os
import tempfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import date, datetime, timezone
from pathlib import Path

import maxminddb

from ooni_pipeline.decompression import iter_bounded

PROBE_IP = "8.8.8.8"
DB_NAME = "asn_cc.mmdb"
TS_NAME = "geoipdbts"


class GeoIPError(RuntimeError):
    """The database is not usable; the message says why."""


def release_ver(day: date) -> str:
    """The release of ``day``'s month: ``YYYYMM01``."""
    return f"{day:%Y%m}01"


def previous_month(day: date) -> date:
    return date(day.year - 1, 12, 1) if day.month == 1 else date(day.year, day.month - 1, 1)


@dataclass(frozen=True)
class MmdbInfo:
    node_count: int
    build_epoch: int
    ip_version: int
    database_type: str
    probe_asn: int
    probe_country: str

    @property
    def built_at(self) -> str:
        return datetime.fromtimestamp(self.build_epoch, tz=timezone.utc).isoformat()


def verify_mmdb(path: Path) -> MmdbInfo:
    """Open the file and look up 8.8.8.8: it must give an integer ASN and a country."""
    try:
        with maxminddb.open_database(str(path)) as reader:
            record = reader.get(PROBE_IP)
            meta = reader.metadata()
    except (maxminddb.InvalidDatabaseError, ValueError, OSError) as exc:
        raise GeoIPError(f"{path.name} is not a readable mmdb: {exc}") from None
    if not isinstance(record, dict):
        raise GeoIPError(f"{path.name}: no record for {PROBE_IP}")
    asn = record.get("autonomous_system_number")
    if not isinstance(asn, int) or isinstance(asn, bool):
        raise GeoIPError(
            f"{path.name}: {PROBE_IP} has no integer autonomous_system_number (got {asn!r})"
        )
    country = record.get("country")
    if isinstance(country, dict):  # MaxMind layout: {"iso_code": "US", ...}
        country = country.get("iso_code")
    if not isinstance(country, str) or not country:
        raise GeoIPError(f"{path.name}: {PROBE_IP} has no country (got {record.get('country')!r})")
    return MmdbInfo(
        meta.node_count, meta.build_epoch, meta.ip_version, meta.database_type, asn, country
    )


def gunzip_to_file(
    chunks: Iterable[bytes],
    target: Path,
    max_bytes: int,
    what: str = "the download",
    hint: str = "",
) -> tuple[int, int]:
    """Write the gunzipped stream to ``target``; return (compressed, uncompressed) bytes.

    At most ``max_bytes`` are unpacked (``DecompressionLimitExceeded``, naming ``what``,
    past them): a release is tens of MB, a bomb of the same download size is gigabytes.
    """
    compressed = written = 0

    def counted() -> Iterator[bytes]:
        nonlocal compressed
        for chunk in chunks:
            compressed += len(chunk)
            yield chunk

    with open(target, "wb") as out:
        try:
            for data in iter_bounded(counted(), "gzip", limit=max_bytes, what=what, hint=hint):
                out.write(data)
                written += len(data)
        except (zlib.error, gzip.BadGzipFile) as exc:
            raise GeoIPError(f"the download is not a valid gzip file: {exc}") from None
        except EOFError:
            raise GeoIPError("the gzip stream is truncated") from None
        if not compressed:
            raise GeoIPError("the download is empty")
        out.flush()
        os.fsync(out.fileno())
    return compressed, written


def write_atomically(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def installed_release(directory: Path) -> tuple[str | None, MmdbInfo | None]:
    """(release in ``geoipdbts``, info of a valid installed file) — None where absent or invalid."""
    ts_path, db_path = directory / TS_NAME, directory / DB_NAME
    release = ts_path.read_text().strip() if ts_path.is_file() else None
    try:
        info = verify_mmdb(db_path) if db_path.is_file() else None
    except GeoIPError:
        info = None
    return release, info
