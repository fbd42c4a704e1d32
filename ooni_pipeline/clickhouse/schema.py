"""OONI's table definitions, created on first use (``CREATE TABLE IF NOT EXISTS``).

Column lists follow ``docs/Database.md`` of ooni/backend (see CONTRACT.md). A
staging table (``_tmp``, ``_flip``) has exactly the DDL of its live table.
"""

from __future__ import annotations

from ooni_pipeline.clickhouse.connection import ClickHouse, quote_identifier

FASTPATH_COLUMNS = """
    measurement_uid String,
    report_id String,
    input String,
    probe_cc LowCardinality(String),
    probe_asn Int32,
    test_name LowCardinality(String),
    test_start_time DateTime,
    measurement_start_time DateTime,
    filename String,
    scores String,
    platform String,
    anomaly String,
    confirmed String,
    msm_failure String,
    domain String,
    software_name String,
    software_version String,
    control_failure String,
    blocking_general Float32,
    is_ssl_expected Int8,
    page_len Int32,
    page_len_ratio Float32,
    server_cc String,
    server_asn Int8,
    server_as_name String,
    update_time DateTime64(3) MATERIALIZED now64(),
    test_version String,
    architecture String,
    engine_name LowCardinality(String),
    engine_version String,
    test_runtime Float32,
    blocking_type String,
    test_helper_address LowCardinality(String),
    test_helper_type LowCardinality(String)
"""

_FINGERPRINT_COLUMNS = """
    name String,
    scope Enum8({scopes}),
    other_names String,
    location_found String,
    pattern_type Enum8('full' = 1, 'prefix' = 2, 'contains' = 3, 'regexp' = 4),
    pattern String,
    confidence_no_fp UInt8,
    expected_countries String,
    source String,
    exp_url String,
    notes String
"""

DNS_SCOPES = ("nat", "isp", "prod", "inst", "vbw", "fp")
HTTP_SCOPES = (*DNS_SCOPES, "injb", "prov")
PATTERN_TYPES = ("full", "prefix", "contains", "regexp")


def _enum(values: tuple[str, ...]) -> str:
    return ", ".join(f"'{value}' = {i}" for i, value in enumerate(values, start=1))


BLOCKING_STATUS_COLUMNS = """
    hour DateTime('UTC'),
    probe_cc LowCardinality(String),
    probe_asn UInt32,
    domain String,
    measurements UInt32,
    share_accessible Float32,
    share_dns Float32,
    share_tcp_ip Float32,
    share_http_diff Float32,
    share_http_failure Float32,
    share_anomaly Float32,
    share_failure Float32,
    blocked_share Float32,
    state Enum8('unknown' = 0, 'ok' = 1, 'blocked' = 2),
    change Int8,
    s_pos Float64,
    s_neg Float64,
    last_measured DateTime('UTC'),
    update_time DateTime64(3, 'UTC')
"""

BLOCKING_EVENTS_COLUMNS = """
    event_id String,
    kind Enum8('blocking' = 1, 'no_measurements' = 2),
    probe_cc LowCardinality(String),
    domain String,
    status Enum8('ongoing' = 1, 'ended' = 2, 'withdrawn' = 3),
    onset Enum8('change' = 1, 'initial' = 2),
    start_hour DateTime('UTC'),
    end_hour Nullable(DateTime('UTC')),
    networks Array(UInt32),
    peak_networks UInt32,
    explorer_url String,
    first_detected DateTime64(3, 'UTC'),
    updated DateTime64(3, 'UTC'),
    announced LowCardinality(String),
    version DateTime64(3, 'UTC')
"""

# name -> (columns, engine clause)
_TABLES: dict[str, tuple[str, str]] = {
    "fastpath": (
        FASTPATH_COLUMNS,
        "ENGINE = ReplacingMergeTree(update_time) "
        "ORDER BY (measurement_start_time, report_id, input, measurement_uid)",
    ),
    "citizenlab": (
        "domain String, url String, cc FixedString(32), category_code String",
        "ENGINE = ReplacingMergeTree ORDER BY (domain, url, cc, category_code)",
    ),
    "fingerprints_dns": (
        _FINGERPRINT_COLUMNS.format(scopes=_enum(DNS_SCOPES)),
        "ENGINE = EmbeddedRocksDB PRIMARY KEY name",
    ),
    "fingerprints_http": (
        _FINGERPRINT_COLUMNS.format(scopes=_enum(HTTP_SCOPES)),
        "ENGINE = EmbeddedRocksDB PRIMARY KEY name",
    ),
    "asnmeta": (
        "asn UInt32, org_name String, cc String, changed Date, aut_name String, source String",
        "ENGINE = MergeTree ORDER BY (asn, changed)",
    ),
    "blocking_status": (
        BLOCKING_STATUS_COLUMNS,
        "ENGINE = ReplacingMergeTree(update_time) PARTITION BY toDate(hour) "
        "ORDER BY (hour, probe_cc, domain, probe_asn)",
    ),
    "blocking_events": (
        BLOCKING_EVENTS_COLUMNS,
        "ENGINE = ReplacingMergeTree(version) ORDER BY event_id",
    ),
    # The hours of a detector pass whose swap into blocking_status began and did not
    # end (see detector.status.replace_partitions): the next pass computes them again.
    "blocking_status_redo": (
        "first_hour DateTime('UTC'), last_hour DateTime('UTC'), since DateTime64(3, 'UTC')",
        "ENGINE = MergeTree ORDER BY first_hour",
    ),
}

# The project's own derived tables: created by the asset that writes them, on a server
# too (nothing else writes them, and they start empty by design).
DERIVED_TABLES = frozenset({"blocking_status", "blocking_events", "blocking_status_redo"})

# staging table -> its live table
STAGING_OF = {
    "citizenlab_flip": "citizenlab",
    "fingerprints_dns_tmp": "fingerprints_dns",
    "fingerprints_http_tmp": "fingerprints_http",
    "asnmeta_tmp": "asnmeta",
    "blocking_status_tmp": "blocking_status",
}

KNOWN_TABLES = (*_TABLES, *STAGING_OF)
# OONI's own tables: never created implicitly on a server (see ensure_tables).
OONI_TABLES = tuple(name for name in _TABLES if name not in DERIVED_TABLES)


def create_table_sql(name: str) -> str:
    """The ``CREATE TABLE IF NOT EXISTS`` statement of a known OONI table."""
    columns, engine = _TABLES[STAGING_OF.get(name, name)]
    return f"CREATE TABLE IF NOT EXISTS {quote_identifier(name)} ({columns}) {engine}"


class MissingTableError(RuntimeError):
    """An OONI table is missing on a ClickHouse server (never created implicitly)."""


def ensure_tables(ch: ClickHouse, *names: str) -> None:
    """Create the named tables if missing; idempotent.

    On a ClickHouse server, OONI's own tables are never created implicitly: a missing
    one means a wrong ``OONI_CLICKHOUSE_URL`` (database, server) far more often than a
    new deployment, and an empty table created there would be exported, backed up
    and served as if it were OONI's data. Staging tables, and the project's derived
    tables (``DERIVED_TABLES``, written only by their asset), are created as needed.
    """
    for name in names:
        if name not in KNOWN_TABLES:
            raise ValueError(f"unknown table {name!r}; known: {', '.join(KNOWN_TABLES)}")
        if not ch.embedded and name in OONI_TABLES:
            exists = ch.scalar(
                "SELECT count() FROM system.tables WHERE database = currentDatabase() "
                "AND name = {t:String}",
                {"t": name},
            )
            if not exists:
                raise MissingTableError(
                    f"table {name} does not exist on {ch.display_url}; against a server OONI's "
                    f"tables are never created implicitly: check OONI_CLICKHOUSE_URL, or create "
                    f"it with the DDL printed by `python -m ooni_pipeline.clickhouse.schema {name}`"
                )
            continue
        ch.command(create_table_sql(name))


if __name__ == "__main__":
    import sys

    for table in sys.argv[1:] or list(_TABLES):
        print(create_table_sql(table) + ";")
