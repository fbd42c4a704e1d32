"""Build ``fastpath`` rows from one upload day of OONI's open bucket, inside ClickHouse.

Python streams each postcan of the day once (boto3, gzip, tarfile) and hands the raw
members to ClickHouse as RowBinary, which parses and scores each of them
(``scoring_sql``) into a staging table while Python reads the next ones: embedded,
straight from a FIFO into the scoring statement; on a server, into a scratch table
first (over one streamed HTTP insert), then scored. Only then, if the day is sound,
are the new rows copied into ``fastpath`` with one INSERT ... SELECT. A corrupt or
truncated postcan fails the day, naming its key, and ``fastpath`` is left as it was.

Re-ingesting a day copies only rows that differ from their latest version, so an
unchanged day writes nothing and the data version of the days it holds stays put;
``fastpath`` is a ReplacingMergeTree(update_time), so a changed measurement
supersedes its old version and the exports keep the latest (argMax by update_time).
"""

from __future__ import annotations

import re
import tarfile
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from ooni_pipeline.clickhouse import ClickHouse, quote_identifier
from ooni_pipeline.clickhouse.schema import FASTPATH_COLUMNS
from ooni_pipeline.decompression import DecompressionLimitExceeded, GiB, iter_bounded
from ooni_pipeline.fastpath.public_bucket import PublicBucket
from ooni_pipeline.fastpath.scoring_sql import (
    MALFORMED_REASONS,
    SCORING_QUERY_SETTINGS,
    scoring_select,
)
from ooni_pipeline.fastpath.tar_stream import TarStream

# Every stored column of fastpath, in its DDL order (update_time is materialized).
ROW_COLUMNS = tuple(
    line.split()[0]
    for line in FASTPATH_COLUMNS.strip().rstrip(",").split("\n")
    if line.strip() and "MATERIALIZED" not in line
)
EXAMPLES_PER_REASON = 3
DEFAULT_MAX_MALFORMED_SHARE = 0.01
# Small blocks bound the memory of the scoring query: each row carries its measurement
# and its parsed parts.
SCORING_SETTINGS = (
    "SETTINGS max_block_size = 512, min_insert_block_size_rows = 65536, "
    f"min_insert_block_size_bytes = 33554432, {SCORING_QUERY_SETTINGS}"
)
# A member as the engine reads it.
MEMBER_STRUCTURE = "member_key String, member_name String, raw String"
# A measurement is at most about 1 MB (fastpath core.py); a member far larger is hostile.
MAX_MEMBER_BYTES = 64 * 1024 * 1024
# A postcan is about 20 MB of gzip, some 60 MB unpacked; every byte of the tar stream
# counts, skipped members too.
DEFAULT_MAX_POSTCAN_BYTES = GiB
# Members are handed on in blocks of about this many bytes.
BLOCK_BYTES = 4 * 1024 * 1024


class IngestError(RuntimeError):
    """The upload day cannot be ingested; nothing of it was written."""


@dataclass
class IngestReport:
    day: str
    postcans: int = 0
    compressed_bytes: int = 0
    members: int = 0
    scored: int = 0
    inserted: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)
    measurement_days: list[str] = field(default_factory=list)
    # ClickHouse's estimate of the live fastpath rows the comparison reads
    live_rows_read_estimate: int = 0
    duration_s: float = 0.0

    @property
    def malformed(self) -> int:
        return sum(n for reason, n in self.skipped.items() if reason in MALFORMED_REASONS)


def ingest_upload_day(
    ch: ClickHouse,
    bucket: PublicBucket,
    day: str,
    *,
    max_malformed_share: float = DEFAULT_MAX_MALFORMED_SHARE,
    max_postcan_bytes: int = DEFAULT_MAX_POSTCAN_BYTES,
    log: Callable[[str], None] = lambda message: None,
    run_id: str | None = None,
) -> IngestReport:
    """Score and insert the measurements of upload day ``day`` (YYYY-MM-DD); a postcan
    that unpacks to more than ``max_postcan_bytes`` fails the day. ``run_id`` (a
    Dagster run's) names the scratch tables, so two runs never share them and a dead
    run's are found (``drop_scratch_tables``); unset, a random id."""
    started = time.monotonic()
    report = IngestReport(day)
    postcans = bucket.list_postcans(day)
    report.postcans = len(postcans)
    report.compressed_bytes = sum(size for _, size in postcans)
    if not postcans:
        log(f"{day}: no postcans under {bucket.day_prefix(day)} for this configuration")
        report.duration_s = time.monotonic() - started
        return report
    log(f"{day}: {len(postcans)} postcans, {report.compressed_bytes / 1e6:.1f} MB")

    with _scratch_tables(ch, day, run_id or uuid.uuid4().hex) as (members, staging, changed):
        blocks = _member_blocks(bucket, postcans, max_postcan_bytes, log)
        _score_into(ch, staging, members, blocks)
        _count_skips(ch, staging, report)
        log(
            f"{day}: members read and scored in {time.monotonic() - started:.1f} s "
            f"(peak RSS {_peak_rss_mb()} MB)"
        )
        share = report.malformed / report.members if report.members else 0.0
        if share > max_malformed_share:
            raise IngestError(
                f"upload day {day}: {report.malformed} of {report.members} members malformed "
                f"({share:.1%} > {max_malformed_share:.0%}); nothing written. "
                f"Examples: {_examples_text(report)}"
            )
        report.inserted, report.measurement_days, report.live_rows_read_estimate = _insert_changed(
            ch, staging, changed
        )
    report.duration_s = time.monotonic() - started
    log(
        f"{day}: {report.members} members, {report.scored} scored, {report.inserted} new or changed "
        f"rows, skipped {report.skipped or 'none'} in {report.duration_s:.1f} s"
    )
    return report


def _member_blocks(
    bucket: PublicBucket,
    postcans: list[tuple[str, int]],
    max_postcan_bytes: int,
    log: Callable[[str], None],
) -> Iterator[bytes]:
    """Stream each postcan once and yield its ``.post`` members as RowBinary rows
    (``MEMBER_STRUCTURE``), in blocks of about ``BLOCK_BYTES``: raw bytes, no Python
    parsing; JSON parsing and scoring stay in the engine.

    ClickHouse can read tar members from S3 itself (``s3(url :: **.post)``), but it
    reopens a ``.tar.gz`` from its start for every member: measured 5.5 s for one
    4 MB postcan of 300 members, quadratic in the postcan's size. Here each postcan is
    streamed once, gunzipped with a cap on its unpacked size, its members cut out by
    ``TarStream`` (tarfile's rules, a third of tarfile's time).
    """
    block: list[bytes] = []
    block_bytes = 0
    for number, (key, _size) in enumerate(postcans, start=1):
        key_field = rowbinary_string(key.encode())
        try:
            with bucket.open(key) as body:
                unpacked = iter_bounded(
                    body,
                    "gzip",
                    limit=max_postcan_bytes,
                    what=f"postcan {key}",
                    hint="raise max_postcan_unpacked_bytes in the run config of public_fastpath "
                    "if a genuine postcan is that large",
                )
                tar = TarStream(unpacked)
                for member in tar:
                    # s3feeder.load_multiple: regular members named .../<uid>.post
                    if not (member.isfile() and member.name.endswith(b".post")):
                        continue
                    if member.size > MAX_MEMBER_BYTES:
                        raise IngestError(
                            f"member {member.name[:200].decode(errors='replace')!r} is {member.size} bytes, over {MAX_MEMBER_BYTES}"
                        )
                    data = tar.data()
                    block += (key_field, rowbinary_string(member.name), rowbinary_string(data))
                    block_bytes += len(data)
                    if block_bytes >= BLOCK_BYTES:
                        yield b"".join(block)
                        block, block_bytes = [], 0
        except IngestError as exc:
            raise IngestError(f"postcan {key}: {exc}") from None
        except DecompressionLimitExceeded as exc:
            raise IngestError(str(exc)) from None
        except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
            raise IngestError(
                f"cannot read postcan {key} (corrupt or truncated): {type(exc).__name__}: {str(exc)[:200]}"
            ) from None
        if number % 50 == 0:
            log(f"{number}/{len(postcans)} postcans read")
    if block:
        yield b"".join(block)


def rowbinary_string(data: bytes) -> bytes:
    """A RowBinary String: its length as a LEB128 varint, then its bytes."""
    size, prefix = len(data), bytearray()
    while size >= 0x80:
        prefix.append((size & 0x7F) | 0x80)
        size >>= 7
    prefix.append(size)
    return bytes(prefix) + data


def _score_into(ch: ClickHouse, staging: str, members: str, blocks: Iterator[bytes]) -> None:
    """Score the members of ``blocks`` into ``staging``. Embedded, the scoring
    statement reads them as they are produced; a server gets them into the scratch
    table ``members`` (one streamed insert: the server writes as they arrive), then
    scores them with one statement."""
    columns = ", ".join(("member_key", "member_name", "skip_reason", *ROW_COLUMNS))
    insert = f"INSERT INTO {quote_identifier(staging)} ({columns})"
    if ch.embedded:
        ch.command_reading(
            lambda source: f"{insert} {scoring_select(source)} {SCORING_SETTINGS}",
            blocks,
            MEMBER_STRUCTURE,
        )
    else:
        ch.raw_insert(members, blocks, "RowBinary")
        ch.command(f"{insert} {scoring_select(quote_identifier(members))} {SCORING_SETTINGS}")


def _count_skips(ch: ClickHouse, staging: str, report: IngestReport) -> None:
    staging = quote_identifier(staging)
    for reason, count, examples in ch.query_rows(
        f"SELECT skip_reason, count(), groupArray({EXAMPLES_PER_REASON})(concat(member_key, ':', member_name)) "
        f"FROM {staging} GROUP BY skip_reason ORDER BY skip_reason"
    ):
        report.members += int(count)
        if reason:
            report.skipped[str(reason)] = int(count)
            report.examples[str(reason)] = [f"{example}: {reason}" for example in examples]
        else:
            report.scored = int(count)


def live_rows_filter(days: list[str]) -> tuple[str, dict[str, str]]:
    """A WHERE condition on ``fastpath`` selecting the UTC measurement days ``days``
    (YYYY-MM-DD; ``measurement_start_time`` is UTC whatever the server's time zone), as ranges of its first ORDER BY column, so the primary index reads
    those days only: an upload day holding one measurement dated years back (a probe
    with a bad clock) reads that day, not the years between."""
    ranges, params = [], {}
    for i, day in enumerate(days):
        ranges.append(
            f"(measurement_start_time >= toDateTime({{d{i}:Date}}, 'UTC') "
            f"AND measurement_start_time < toDateTime({{d{i}:Date}} + 1, 'UTC'))"
        )
        params[f"d{i}"] = day
    return "(" + " OR ".join(ranges or ["0"]) + ")", params


def estimated_rows(ch: ClickHouse, table: str, where: str, params: dict[str, Any]) -> int:
    """ClickHouse's estimate (from its primary index) of the rows a filter reads (a
    column is selected: ``count()`` alone may be answered from the index)."""
    rows = ch.query_rows(
        f"EXPLAIN ESTIMATE SELECT measurement_uid FROM {quote_identifier(table)} WHERE {where}",
        params,
    )
    header_free = [row for row in rows if len(row) >= 4]
    return int(sum(int(row[3]) for row in header_free))


def _insert_changed(ch: ClickHouse, staging: str, changed: str) -> tuple[int, list[str], int]:
    """Copy the staged rows that are new or differ from their live version into
    ``fastpath``; return how many, the measurement days they belong to, and the
    estimated live rows the comparison read.

    The live version is the latest one (``argMax`` by ``update_time``, as the readers
    take it), not any stored one: a scoring rolled back to an earlier one (a
    fingerprint added, then removed) differs from the latest and is written again.

    The comparison with the live rows (uid and a hash of every column) runs once, into
    ``changed``, over the staged rows' measurement days only (``live_rows_filter``);
    the copy into ``fastpath`` is then one plain INSERT ... SELECT.
    """
    staging, changed = quote_identifier(staging), quote_identifier(changed)
    columns = ", ".join(quote_identifier(c) for c in ROW_COLUMNS)
    days = [
        str(day)
        for (day,) in ch.query_rows(
            f"SELECT DISTINCT toString(toDate(measurement_start_time, 'UTC')) AS d FROM {staging} "
            "WHERE skip_reason = '' ORDER BY d"
        )
    ]
    if not days:
        return 0, [], 0
    where, params = live_rows_filter(days)
    estimate = estimated_rows(ch, "fastpath", where, params)
    ch.command(
        f"""INSERT INTO {changed} ({columns})
        SELECT {columns} FROM {staging}
        WHERE skip_reason = ''
          AND (measurement_uid, cityHash64({columns})) NOT IN (
              SELECT measurement_uid, argMax(cityHash64({columns}), update_time) FROM fastpath
              WHERE {where}
                AND measurement_uid IN (SELECT measurement_uid FROM {staging} WHERE skip_reason = '')
              GROUP BY measurement_uid)
        LIMIT 1 BY measurement_uid""",
        params,
    )
    count = int(ch.scalar(f"SELECT count() FROM {changed}"))
    if count:
        ch.command(f"INSERT INTO fastpath ({columns}) SELECT {columns} FROM {changed}")
    changed_days = ch.query_rows(
        f"SELECT DISTINCT toString(toDate(measurement_start_time, 'UTC')) AS d FROM {changed} ORDER BY d"
    )
    return count, [str(day) for (day,) in changed_days], estimate


SCRATCH_PREFIX = "fastpath_ingest_"
_SCRATCH_NAME = re.compile(r"fastpath_ingest_(\d{8})(?:_([0-9a-f]{32}))?(?:_members|_changed)?")


@contextmanager
def _scratch_tables(ch: ClickHouse, day: str, run_id: str) -> Iterator[tuple[str, str, str]]:
    """This run's scratch tables for the day, dropped whatever happens: the raw
    members, the scored rows (each with its skip reason), and the rows that changed.
    Named by day and run, so two runs of one day never touch each other's; local to
    the node connected to (plain ``Log`` tables, no ``ON CLUSTER``)."""
    base = f"{SCRATCH_PREFIX}{day.replace('-', '')}_{run_id.replace('-', '')}"
    names = (f"{base}_members", base, f"{base}_changed")
    schemas = (
        MEMBER_STRUCTURE,
        f"member_key String, member_name String, skip_reason LowCardinality(String), {FASTPATH_COLUMNS}",
        FASTPATH_COLUMNS,
    )
    try:
        for name, schema in zip(names, schemas, strict=True):
            ch.command(f"DROP TABLE IF EXISTS {quote_identifier(name)} SYNC")
            ch.command(f"CREATE TABLE {quote_identifier(name)} ({schema}) ENGINE = Log")
        yield names
    finally:
        for name in names:
            ch.command(f"DROP TABLE IF EXISTS {quote_identifier(name)} SYNC")


def drop_scratch_tables(ch: ClickHouse, run_alive: Callable[[str], bool | None]) -> list[str]:
    """Drop the scratch tables a killed run left behind: those of a run that is no
    longer alive (``run_alive(run_id)`` is False), and those named by day only (an
    earlier version's). A run nobody here knows keeps its tables. Returns the dropped."""
    dropped = []
    for (name,) in ch.query_rows(
        "SELECT name FROM system.tables WHERE database = currentDatabase() "
        "AND startsWith(name, {prefix:String})",
        {"prefix": SCRATCH_PREFIX},
    ):
        match = _SCRATCH_NAME.fullmatch(str(name))
        if match is None:
            continue
        run = match.group(2)
        if run is None or run_alive(str(uuid.UUID(run))) is False:
            ch.command(f"DROP TABLE IF EXISTS {quote_identifier(str(name))} SYNC")
            dropped.append(str(name))
    return dropped


def _peak_rss_mb() -> int:
    """This process's peak resident memory so far, for the progress log."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024


def _examples_text(report: IngestReport) -> str:
    return "; ".join(example for examples in report.examples.values() for example in examples[:2])
