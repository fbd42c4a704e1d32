"""OONI's table definitions, created on first use (``CREATE TABLE IF NOT EXISTS``).

Column lists, engines and settings follow ``docs/Database.md`` of ooni/backend and
ooni/devops ``scripts/cluster-migration/schema.sql`` (see CONTRACT.md). A table
that exists is never redefined: it may be the operator's, with columns, settings
or a ``Replicated*`` engine of its own. A staging table (``_tmp``, ``_flip``) is
built from its live table's definition (``staging_twin``).
"""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True)
class TableDef:
    """A table's DDL in parts, so one definition serves one server and a cluster."""

    columns: str
    engine: str  # a MergeTree-family name, or another engine (EmbeddedRocksDB)
    args: str = ""  # the engine's own arguments
    rest: str = ""  # PARTITION BY / ORDER BY / PRIMARY KEY / SETTINGS

    @property
    def replicable(self) -> bool:
        return self.engine.endswith("MergeTree")


# OONI's own DDL (ooni/backend docs/Database.md; ooni/devops
# scripts/cluster-migration/schema.sql for the cluster's engines and paths).
_TABLES: dict[str, TableDef] = {
    "fastpath": TableDef(
        FASTPATH_COLUMNS
        + """,
    INDEX fastpath_rid_idx report_id TYPE minmax GRANULARITY 1,
    INDEX measurement_uid_idx measurement_uid TYPE minmax GRANULARITY 8
""",
        "ReplacingMergeTree",
        "update_time",
        "ORDER BY (measurement_start_time, report_id, input, measurement_uid) "
        "SETTINGS index_granularity = 8192",
    ),
    "citizenlab": TableDef(
        "domain String, url String, cc FixedString(32), category_code String",
        "ReplacingMergeTree",
        "",
        "ORDER BY (domain, url, cc, category_code) SETTINGS index_granularity = 4",
    ),
    "fingerprints_dns": TableDef(
        _FINGERPRINT_COLUMNS.format(scopes=_enum(DNS_SCOPES)),
        "EmbeddedRocksDB",
        "",
        "PRIMARY KEY name",
    ),
    "fingerprints_http": TableDef(
        _FINGERPRINT_COLUMNS.format(scopes=_enum(HTTP_SCOPES)),
        "EmbeddedRocksDB",
        "",
        "PRIMARY KEY name",
    ),
    "asnmeta": TableDef(
        "asn UInt32, org_name String, cc String, changed Date, aut_name String, source String",
        "MergeTree",
        "",
        "ORDER BY (asn, changed) SETTINGS index_granularity = 8192",
    ),
    "blocking_status": TableDef(
        BLOCKING_STATUS_COLUMNS,
        "ReplacingMergeTree",
        "update_time",
        "PARTITION BY toDate(hour) ORDER BY (hour, probe_cc, domain, probe_asn)",
    ),
    "blocking_events": TableDef(
        BLOCKING_EVENTS_COLUMNS, "ReplacingMergeTree", "version", "ORDER BY event_id"
    ),
    # What each consumer of the watchlist file was told about each event (as
    # blocking_events.announced for the operator): one row per (consumer, event).
    "blocking_consumer_announced": TableDef(
        "consumer LowCardinality(String), event_id String, announced LowCardinality(String), "
        "version DateTime64(3, 'UTC')",
        "ReplacingMergeTree",
        "version",
        "ORDER BY (consumer, event_id)",
    ),
    # The hours of a detector pass whose swap into blocking_status began and whose
    # events were not written yet (see detector.status.replace_partitions): the next
    # pass computes them again.
    "blocking_status_redo": TableDef(
        "first_hour DateTime('UTC'), last_hour DateTime('UTC'), since DateTime64(3, 'UTC')",
        "MergeTree",
        "",
        "ORDER BY first_hour",
    ),
}

# The project's own derived tables: created by the asset that writes them, on a server
# too (nothing else writes them, and they start empty by design); on a cluster
# ``ON CLUSTER`` with a ``Replicated*`` engine.
DERIVED_TABLES = frozenset(
    {"blocking_status", "blocking_events", "blocking_status_redo", "blocking_consumer_announced"}
)
# Tables an updater fills: created by that updater where missing, with OONI's DDL.
UPDATER_TABLES = frozenset({"citizenlab", "fingerprints_dns", "fingerprints_http", "asnmeta"})

# staging table -> its live table; a staging table is built from its live table's
# definition (``staging_twin``), never from the DDL above.
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

# Where a table the project creates on a cluster keeps its replicas' state in Keeper:
# OONI's layout (ooni/devops scripts/cluster-migration/schema.sql), one path per table.
KEEPER_PATH = "/clickhouse/{{cluster}}/tables/{{database}}/{table}/{{shard}}"


def create_table_sql(name: str, cluster: str | None = None) -> str:
    """The ``CREATE TABLE IF NOT EXISTS`` statement of a table the project knows.

    With ``cluster``, the statement runs ``ON CLUSTER`` and a MergeTree-family engine
    becomes its ``Replicated*`` form with a Keeper path of the table's own."""
    table = _TABLES[name]
    quoted = quote_identifier(name)
    engine, args = table.engine, table.args
    on_cluster = ""
    if cluster is not None:
        on_cluster = f" ON CLUSTER {quote_identifier(cluster)}"
        if table.replicable:
            engine = f"Replicated{engine}"
            keeper = ["'" + KEEPER_PATH.format(table=name) + "'", "'{replica}'"]
            args = ", ".join([*keeper, *([args] if args else [])])
    engine_clause = f"ENGINE = {engine}" + (f"({args})" if args else "")
    return (
        f"CREATE TABLE IF NOT EXISTS {quoted}{on_cluster} ({table.columns}) "
        f"{engine_clause} {table.rest}"
    )


class MissingTableError(RuntimeError):
    """An OONI table is missing on a ClickHouse server (never created implicitly)."""


def _exists(ch: ClickHouse, name: str) -> bool:
    return bool(
        ch.scalar(
            "SELECT count() FROM system.tables WHERE database = currentDatabase() "
            "AND name = {t:String}",
            {"t": name},
        )
    )


def ensure_tables(ch: ClickHouse, *names: str) -> None:
    """Create the named tables if missing; idempotent.

    On a ClickHouse server, OONI's own tables are never created implicitly: a missing
    one means a wrong ``OONI_CLICKHOUSE_URL`` (database, server) far more often than a
    new deployment, and an empty table created there would be exported, backed up
    and served as if it were OONI's data. The updaters create theirs
    (``ensure_updater_table``), since they fill them at once. Staging tables are
    built from their live table (``staging_twin``), and the project's derived tables
    (``DERIVED_TABLES``, written only by their asset) are created as needed, on the
    cluster when there is one.
    """
    for name in names:
        if name not in KNOWN_TABLES:
            raise ValueError(f"unknown table {name!r}; known: {', '.join(KNOWN_TABLES)}")
        if name in STAGING_OF:
            live = STAGING_OF[name]
            if live in DERIVED_TABLES:
                ensure_tables(ch, live)
            elif live in UPDATER_TABLES:
                ensure_updater_table(ch, live)
            staging_twin(ch, live, name)
        elif not ch.embedded and name in OONI_TABLES:
            if not _exists(ch, name):
                raise MissingTableError(
                    f"table {name} does not exist on {ch.display_url}; against a server OONI's "
                    f"tables are never created implicitly: check OONI_CLICKHOUSE_URL, or create "
                    f"it with the DDL printed by `python -m ooni_pipeline.clickhouse.schema {name}`"
                )
        else:
            _create_if_missing(ch, name)


def ensure_updater_table(ch: ClickHouse, name: str) -> None:
    """Create an updater's live table with OONI's DDL if it is missing (on a server and
    a cluster too: the updater fills it at once); an existing one is never touched."""
    if name not in UPDATER_TABLES:
        raise ValueError(f"{name!r} is not an updater's table")
    _create_if_missing(ch, name)


def _create_if_missing(ch: ClickHouse, name: str) -> None:
    if not _exists(ch, name):
        ch.command(create_table_sql(name, ch.cluster))


# -- staging twins ----------------------------------------------------------------


class StagingMismatchError(RuntimeError):
    """A staging table cannot be made to match its live table."""


@dataclass(frozen=True)
class TableShape:
    """What ``REPLACE PARTITION`` (and an exchange) needs two tables to share."""

    engine: str  # without ``Replicated``
    keys: tuple[str, ...]  # partition, sorting, primary, sampling keys, storage policy
    # SHOW CREATE between its first line (the name) and ENGINE: every column with its
    # type, default, codec and comment, the indexes, constraints and projections (with
    # their queries): everything ``AS live`` copies, compared whole.
    body: str

    @property
    def merge_tree(self) -> bool:
        return self.engine.endswith("MergeTree")


def table_shape(ch: ClickHouse, name: str) -> tuple[TableShape, str]:
    """The shape of an existing table, and its ``engine_full``."""
    rows = ch.query_rows(
        "SELECT engine, engine_full, partition_key, sorting_key, "
        "primary_key, sampling_key, storage_policy FROM system.tables "
        "WHERE database = currentDatabase() AND name = {t:String}",
        {"t": name},
    )
    if not rows:
        raise MissingTableError(f"table {name} does not exist on {ch.display_url}")
    engine, engine_full, *keys = (str(v) for v in rows[0])
    create = str(ch.scalar(f"SHOW CREATE TABLE {quote_identifier(name)}"))
    body = create.split("\n", 1)[-1].split("\nENGINE", 1)[0]
    shape = TableShape(engine=engine.removeprefix("Replicated"), keys=tuple(keys), body=body)
    return shape, engine_full


def _split_engine(engine_full: str) -> tuple[str, list[str], str]:
    """``Name(arg, ...) rest`` -> (name, [arg, ...], rest), arguments split at their
    top-level commas, string literals kept whole."""
    name_end = 0
    while name_end < len(engine_full) and (
        engine_full[name_end].isalnum() or engine_full[name_end] == "_"
    ):
        name_end += 1
    name, tail = engine_full[:name_end], engine_full[name_end:]
    if not tail.startswith("("):
        return name, [], tail.strip()
    args, depth, quote, current, i = [], 0, False, "", 0
    while i < len(tail):
        c = tail[i]
        if quote:
            current += c
            if c == "\\" and i + 1 < len(tail):
                current += tail[i + 1]
                i += 1
            elif c == "'":
                quote = False
        elif c == "'":
            quote, current = True, current + c
        elif c == "(":
            depth += 1
            if depth > 1:
                current += c
        elif c == ")":
            depth -= 1
            if depth == 0:
                break
            current += c
        elif c == "," and depth == 1:
            args.append(current.strip())
            current = ""
        else:
            current += c
        i += 1
    if depth != 0:
        raise StagingMismatchError(f"cannot read the engine clause of {name}")
    if current.strip():
        args.append(current.strip())
    return name, args, tail[i + 1 :].strip()


def plain_engine(engine_full: str) -> str:
    """The engine clause of a MergeTree-family table without replication: a staging
    twin of a ``Replicated*`` table is local and must not share its Keeper path.

    ``ReplicatedX('/path', '{replica}', a) ORDER BY …`` -> ``X(a) ORDER BY …``; the two
    Keeper arguments are there only when both are string literals (they may be left
    to the server's defaults)."""
    name, args, rest = _split_engine(engine_full)
    if name.startswith("Replicated"):
        name = name.removeprefix("Replicated")
        if len(args) >= 2 and all(a.startswith("'") for a in args[:2]):
            args = args[2:]
    return f"{name}({', '.join(args)}) {rest}".strip()


def staging_twin(ch: ClickHouse, live: str, staging: str) -> TableShape:
    """Make ``staging`` a local table of exactly ``live``'s shape, and return it.

    A MergeTree-family live table gets a twin ``AS live`` with its engine clause
    made local (``plain_engine``): ``REPLACE PARTITION`` then copies the twin's parts
    into the live table, whose definition stays the operator's. Any other engine
    (``EmbeddedRocksDB``) gets an exact copy ``AS live``, exchanged whole. A staging
    table left with another shape (an older definition, another version of the
    project) is dropped and rebuilt, never trusted.
    """
    quote_identifier(staging)
    live_shape, engine_full = table_shape(ch, live)
    if _exists(ch, staging):
        staging_shape, staging_full = table_shape(ch, staging)
        same = staging_shape == live_shape and (
            live_shape.merge_tree or staging_full == engine_full
        )
        if same:
            return live_shape
        ch.command(f"DROP TABLE {quote_identifier(staging)} SYNC")
    if live_shape.merge_tree:
        ch.command(
            f"CREATE TABLE {quote_identifier(staging)} AS {quote_identifier(live)} "
            f"ENGINE = {plain_engine(engine_full)}"
        )
    elif engine_full.startswith("Replicated"):
        raise StagingMismatchError(f"{live}: a replicated {live_shape.engine} has no local twin")
    elif live_shape.engine == "EmbeddedRocksDB" and len(_split_engine(engine_full)[1]) >= 2:
        # EmbeddedRocksDB(ttl, rocksdb_dir, ...): a copy would open the same directory.
        raise StagingMismatchError(
            f"{live} keeps its RocksDB data in a directory of its own (rocksdb_dir): a "
            "staging copy cannot share it, so it cannot be updated atomically; recreate "
            'it without rocksdb_dir (docs/clickhouse.md, "Tables the operator owns")'
        )
    else:
        ch.command(f"CREATE TABLE {quote_identifier(staging)} AS {quote_identifier(live)}")
    staging_shape, staging_full = table_shape(ch, staging)
    if staging_shape != live_shape or (not live_shape.merge_tree and staging_full != engine_full):
        raise StagingMismatchError(
            f"{staging} was rebuilt from {live} and still differs from it; nothing was changed"
        )
    return live_shape


if __name__ == "__main__":
    import sys

    from ooni_pipeline import settings

    cluster = settings.env("OONI_CLICKHOUSE_CLUSTER")
    for table in sys.argv[1:] or list(_TABLES):
        print(create_table_sql(table, cluster) + ";")
