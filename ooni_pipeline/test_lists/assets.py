"""The ``citizenlab`` asset: the CitizenLab test lists in ClickHouse."""

import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import dagster as dg
from pydantic import Field

from ooni_pipeline import settings
from ooni_pipeline.clickhouse import ClickHouse, ClickHouseResource
from ooni_pipeline.clickhouse.schema import ensure_tables, ensure_updater_table
from ooni_pipeline.clickhouse.swap import replace_table
from ooni_pipeline.common import (
    CLICKHOUSE_POOL,
    OWNER,
    TableUpdateConfig,
    column_schema_metadata,
    last_metadata,
    one_run_at_a_time,
    unchanged_result,
)
from ooni_pipeline.test_lists.git import shallow_clone
from ooni_pipeline.test_lists.parse import ParsedLists, read_lists

if TYPE_CHECKING:  # imported where the table is built: the code location loads without it
    import pyarrow as pa

CITIZENLAB_KEY = dg.AssetKey("citizenlab")


class CitizenlabConfig(TableUpdateConfig):
    min_rows_exclusive: int = 20_000
    max_rows_exclusive: int = 1_000_000
    clone_timeout_s: float = Field(default=120.0, description="git clone timeout")
    clone_max_bytes: int = Field(
        default=500_000_000,
        description="cap on the clone's size on disk (download plus files checked out)",
    )


def _arrow(parsed: ParsedLists) -> "pa.Table":
    import pyarrow as pa

    rows = parsed.rows
    return pa.table(
        {
            "domain": pa.array([r.domain for r in rows], pa.string()),
            "url": pa.array([r.url for r in rows], pa.string()),
            "cc": pa.array([r.cc for r in rows], pa.string()),
            "category_code": pa.array([r.category_code for r in rows], pa.string()),
        }
    )


def _changes(ch: ClickHouse) -> tuple[int, int]:
    """(added, removed) (url, cc) pairs, before the swap: flip is new, live is old."""
    added = ch.scalar(
        "SELECT count() FROM (SELECT DISTINCT url, cc FROM citizenlab_flip) "
        "WHERE (url, cc) NOT IN (SELECT url, cc FROM citizenlab)"
    )
    removed = ch.scalar(
        "SELECT count() FROM (SELECT DISTINCT url, cc FROM citizenlab) "
        "WHERE (url, cc) NOT IN (SELECT url, cc FROM citizenlab_flip)"
    )
    return int(added), int(removed)


@dg.asset(
    key=CITIZENLAB_KEY,
    group_name="test_lists",
    kinds={"git", "csv", "clickhouse"},
    owners=[OWNER],
    pool=CLICKHOUSE_POOL,
)
def citizenlab(
    context: dg.AssetExecutionContext, config: CitizenlabConfig, clickhouse: ClickHouseResource
) -> dg.MaterializeResult:
    """The CitizenLab test lists (URLs to test, per country, with their category) in the
    ClickHouse table ``citizenlab``, read by OONI probes and the API. Cloned from
    ``OONI_TEST_LISTS_REPO``, every URL validated strictly, filled into
    ``citizenlab_flip`` and swapped in atomically: a failure at any step leaves
    ``citizenlab`` as it was. An unchanged upstream commit skips the rewrite. The
    repository is untrusted: the clone is bounded in time and size, and a list file
    that is a symlink or not a regular file fails the run, its content unread.
    """
    repo_url = settings.env("OONI_TEST_LISTS_REPO", settings.DEFAULT_TEST_LISTS_REPO)
    previous_commit = last_metadata(context, CITIZENLAB_KEY).get("commit")
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="test-lists-") as tmp:
        checkout = Path(tmp) / "test-lists"
        clone = shallow_clone(repo_url, checkout, config.clone_timeout_s, config.clone_max_bytes)
        commit = clone.commit
        fetch_s = time.monotonic() - start
        context.log.info(f"cloned test lists at commit {commit} in {fetch_s:.1f} s")

        with clickhouse.connect() as ch, one_run_at_a_time(context, ch, "citizenlab"):
            ensure_updater_table(ch, "citizenlab")
            live_rows = ch.count("citizenlab")
            if commit == previous_commit and live_rows > 0 and not config.force:
                return unchanged_result(
                    context,
                    commit,
                    "upstream commit unchanged since the last materialization",
                    live_rows,
                    commit=commit,
                    fetch_s=round(fetch_s, 3),
                )

            parse_start = time.monotonic()
            parsed = read_lists(checkout, clone.symlinks)
            parse_s = time.monotonic() - parse_start
            context.log.info(
                f"{len(parsed.rows)} valid rows from {parsed.files} files; "
                f"{sum(parsed.rejected.values())} rejected {dict(parsed.rejected)}; {parsed.duplicates} duplicates"
            )
            table = _arrow(parsed)
            changes: list[tuple[int, int]] = []
            result = replace_table(
                ch,
                live="citizenlab",
                staging="citizenlab_flip",
                fill=lambda ch, staging: ch.insert_arrow(staging, table),
                bounds=config.bounds(),
                before_swap=lambda ch, staging: changes.append(_changes(ch)),
            )
            added, removed = changes[0]
            per_country = ch.query_rows(
                "SELECT trimRight(toString(cc)) AS cc, count() AS n FROM citizenlab GROUP BY cc ORDER BY n DESC LIMIT 25"
            )
            schema = column_schema_metadata(ch, "citizenlab")

    context.log.info(f"citizenlab swapped in: {result.rows} rows (+{added} / -{removed} URLs)")
    return dg.MaterializeResult(
        data_version=dg.DataVersion(commit),
        metadata={
            "commit": commit,
            "previous_commit": previous_commit or "",
            "skipped": False,
            "dagster/row_count": result.rows,
            "previous_rows": result.previous_rows,
            "files": parsed.files,
            "skipped_files": len(parsed.skipped_files),
            "duplicates": parsed.duplicates,
            "rejected_rows": sum(parsed.rejected.values()),
            "rejected_by_reason": dg.MetadataValue.json(dict(parsed.rejected)),
            # Plain text: the examples quote upstream content, never rendered as Markdown.
            "rejected_examples": dg.MetadataValue.text("\n".join(parsed.examples) or "none"),
            "rows_per_country_top": dg.MetadataValue.json({cc: n for cc, n in per_country}),
            "countries": len({r.cc for r in parsed.rows}),
            "urls_added": added,
            "urls_removed": removed,
            "clone_bytes": clone.bytes,
            "fetch_s": round(fetch_s, 3),
            "parse_s": round(parse_s, 3),
            "update_s": round(result.fill_s + result.swap_s, 3),
            **schema,
        },
    )


@dg.asset_check(
    asset=citizenlab,
    pool=CLICKHOUSE_POOL,
    description="The live table holds rows, each with a valid country code and a domain.",
)
def citizenlab_rows_valid_check(clickhouse: ClickHouseResource) -> dg.AssetCheckResult:
    with clickhouse.connect() as ch:
        ensure_tables(ch, "citizenlab")
        rows, bad_cc, no_domain, no_category = ch.query_rows(
            "SELECT count(), countIf(NOT match(trimRight(toString(cc)), '^[A-Z]{2}$')), "
            "countIf(domain = ''), countIf(category_code = '') FROM citizenlab"
        )[0]
    return dg.AssetCheckResult(
        passed=bool(rows > 0 and bad_cc == 0 and no_domain == 0 and no_category == 0),
        metadata={
            "rows": rows,
            "bad_cc": bad_cc,
            "empty_domain": no_domain,
            "empty_category": no_category,
        },
    )
