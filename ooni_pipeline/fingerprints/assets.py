"""The ``fingerprints_dns`` and ``fingerprints_http`` assets, built by one factory."""

import re
import time

import dagster as dg

from ooni_pipeline import settings
from ooni_pipeline.clickhouse import (
    ClickHouse,
    ClickHouseError,
    ClickHouseResource,
    quote_identifier,
)
from ooni_pipeline.clickhouse.schema import (
    DNS_SCOPES,
    HTTP_SCOPES,
    ensure_tables,
    ensure_updater_table,
)
from ooni_pipeline.clickhouse.swap import replace_table
from ooni_pipeline.common import (
    CLICKHOUSE_POOL,
    OWNER,
    TableUpdateConfig,
    column_schema_metadata,
    one_run_at_a_time,
    previous_validators,
    unchanged_result,
    validators_metadata,
)
from ooni_pipeline.fetch import fetch_bytes
from ooni_pipeline.fingerprints.parse import FingerprintError, parse_fingerprints
from ooni_pipeline.untrusted import excerpt

# RE2's reason in ClickHouse's message, which also repeats the whole pattern.
_RE2_REASON = re.compile(r"error: (.*?)\. Look at", re.DOTALL)


class FingerprintsConfig(TableUpdateConfig):
    min_rows_exclusive: int = 100
    max_rows_exclusive: int = 50_000


def validate_regexps_in_clickhouse(ch: ClickHouse, staging: str, source: str) -> None:
    """Compile every regexp pattern with ClickHouse's own engine (RE2).

    Python's ``re`` accepts patterns RE2 refuses (lookbehind, backreferences); a
    pattern the fastpath cannot compile must not reach the live table.
    """
    rows = ch.query_rows(
        f"SELECT name, pattern FROM {quote_identifier(staging)} WHERE pattern_type = 'regexp'"
    )
    for name, pattern in rows:
        try:
            ch.scalar("SELECT match('', {pattern:String})", {"pattern": pattern})
        except ClickHouseError as exc:
            reason = _RE2_REASON.search(str(exc))
            raise FingerprintError(
                f"{source}: fingerprint {excerpt(name)}: field 'pattern': ClickHouse cannot "
                f"compile {excerpt(pattern)}: {excerpt(reason.group(1)) if reason else 'refused by RE2'}"
            ) from None


def build_fingerprints_asset(
    kind: str, scopes: tuple[str, ...], url_env: str, default_url: str
) -> dg.AssetsDefinition:
    table = f"fingerprints_{kind}"
    key = dg.AssetKey(table)

    @dg.asset(
        key=key,
        group_name="fingerprints",
        kinds={"csv", "http", "clickhouse"},
        owners=[OWNER],
        pool=CLICKHOUSE_POOL,
        description=(
            f"{kind.upper()} blocking fingerprints from ooni/blocking-fingerprints (``{url_env}``) in the "
            f"ClickHouse table ``{table}``, which the fastpath matches to confirm blocking. Every row is "
            f"validated strictly (scope, pattern type, regexps, confidence, unique names); a bad row fails "
            f"the run with file, line and field named. Filled into ``{table}_tmp`` and swapped in atomically; "
            "an unchanged source (ETag / Last-Modified) skips the rewrite."
        ),
    )
    def _asset(
        context: dg.AssetExecutionContext,
        config: FingerprintsConfig,
        clickhouse: ClickHouseResource,
    ) -> dg.MaterializeResult:
        url = settings.env(url_env, default_url)
        previous = None if config.force else previous_validators(context, key)
        start = time.monotonic()
        with clickhouse.connect() as ch, one_run_at_a_time(context, ch, table):
            ensure_updater_table(ch, table)
            live_rows = ch.count(table)
            body, validators = fetch_bytes(url, previous=previous if live_rows else None)
            fetch_s = time.monotonic() - start
            if body is None:
                return unchanged_result(
                    context,
                    validators.describe(),
                    f"source unchanged since the last materialization (HTTP 304 from {url})",
                    live_rows,
                    fetch_s=round(fetch_s, 3),
                    **validators_metadata(validators),
                )
            source = url.rsplit("/", 1)[-1] or url
            parsed = parse_fingerprints(body, source, scopes)
            context.log.info(
                f"fetched {len(body)} bytes, {parsed.table.num_rows} valid fingerprints"
            )
            result = replace_table(
                ch,
                live=table,
                staging=f"{table}_tmp",
                fill=lambda ch, staging: ch.insert_arrow(staging, parsed.table),
                validate=lambda ch, staging: validate_regexps_in_clickhouse(ch, staging, source),
                bounds=config.bounds(),
            )
            schema = column_schema_metadata(ch, table)
        return dg.MaterializeResult(
            data_version=dg.DataVersion(validators.describe()),
            metadata={
                "skipped": False,
                "dagster/row_count": result.rows,
                "previous_rows": result.previous_rows,
                "rows_per_scope": dg.MetadataValue.json(dict(parsed.per_scope)),
                "rows_per_pattern_type": dg.MetadataValue.json(dict(parsed.per_pattern_type)),
                "bytes_fetched": len(body),
                "fetch_s": round(fetch_s, 3),
                "update_s": round(result.fill_s + result.swap_s, 3),
                **validators_metadata(validators),
                **schema,
            },
        )

    @dg.asset_check(
        asset=key,
        name=f"{table}_rows_check",
        pool=CLICKHOUSE_POOL,
        description=f"``{table}`` holds rows, all with a pattern.",
    )
    def _check(clickhouse: ClickHouseResource) -> dg.AssetCheckResult:
        with clickhouse.connect() as ch:
            ensure_tables(ch, table)
            rows, empty = ch.query_rows(
                f"SELECT count(), countIf(pattern = '') FROM {quote_identifier(table)}"
            )[0]
        return dg.AssetCheckResult(
            passed=bool(rows > 0 and empty == 0), metadata={"rows": rows, "empty_patterns": empty}
        )

    return _asset, _check


fingerprints_dns, fingerprints_dns_check = build_fingerprints_asset(
    "dns", DNS_SCOPES, "OONI_FINGERPRINTS_DNS_URL", settings.DEFAULT_FINGERPRINTS_DNS_URL
)
fingerprints_http, fingerprints_http_check = build_fingerprints_asset(
    "http", HTTP_SCOPES, "OONI_FINGERPRINTS_HTTP_URL", settings.DEFAULT_FINGERPRINTS_HTTP_URL
)
