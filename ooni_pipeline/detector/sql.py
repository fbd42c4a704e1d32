"""What the detector asks ClickHouse: the watchlist, the hourly outcome counts per
series, the countries' hourly volumes, and its own tables.

``fastpath`` is read as the website-metrics export reads it: web_connectivity rows,
each ``measurement_uid`` once in its latest version (``argMax(..., update_time)``),
each measurement in exactly one category by the same rule
(``exports/website_metrics_sql.category_sql``). Only well-formed country codes count
(two capital letters, not ``ZZ``, the unknown country): a country code becomes an
object key of the feeds.
"""

from ooni_pipeline.exports.watchlists import matching_sql
from ooni_pipeline.exports.website_metrics_sql import CATEGORIES, category_sql

# Blocked: an anomaly of any kind; failures are neither blocked nor accessible (OONI's
# detector weighs an hour by its usable measurements only).
BLOCKED_CATEGORIES = ("dns", "tcp_ip", "http-diff", "http-failure", "anomaly")
SHARE_COLUMNS = {category: f"share_{category.replace('-', '_')}" for category in CATEGORIES}

WATCHLIST_SQL = """
SELECT DISTINCT domain
FROM citizenlab
WHERE category_code IN {categories:Array(String)} AND cc = {cc:String} AND domain != ''
ORDER BY domain
"""

_WELL_FORMED_CC = "match(probe_cc, '^[A-Z]{2}$') AND probe_cc != 'ZZ'"

# One row per (hour, series) with measurements in [start, end): counts per category.
HOURLY_COUNTS_SQL = f"""
SELECT
    toInt64(toUnixTimestamp(toStartOfHour(latest.1)) / 3600) AS hour,
    latest.2 AS probe_cc,
    toUInt32(latest.3) AS probe_asn,
    latest.4 AS domain,
    count() AS measurements,
    {", ".join(f"countIf(category = '{c}') AS `{c}`" for c in CATEGORIES)}
FROM (
    SELECT
        argMax(
            (measurement_start_time, toString(probe_cc), probe_asn, domain,
             msm_failure, anomaly, blocking_type),
            update_time
        ) AS latest,
        {category_sql("latest.5", "latest.6", "latest.7")} AS category
    FROM fastpath
    WHERE test_name = 'web_connectivity'
      AND measurement_start_time >= toDateTime({{start:String}}, 'UTC')
      AND measurement_start_time < toDateTime({{end:String}}, 'UTC')
      AND domain IN {{domains:Array(String)}}
    GROUP BY measurement_uid
)
WHERE match(latest.2, '^[A-Z]{{2}}$') AND latest.2 != 'ZZ' AND latest.3 >= 0
GROUP BY hour, probe_cc, probe_asn, domain
ORDER BY hour
"""

# Web_connectivity measurements per (country, hour), every domain: the volume whose
# collapse is a "no measurements" event. Distinct uids, so unmerged duplicates do
# not count twice.
COUNTRY_VOLUME_SQL = f"""
SELECT
    toInt64(toUnixTimestamp(toStartOfHour(measurement_start_time)) / 3600) AS hour,
    toString(probe_cc) AS probe_cc,
    uniqExact(measurement_uid) AS measurements
FROM fastpath
WHERE test_name = 'web_connectivity'
  AND measurement_start_time >= toDateTime({{start:String}}, 'UTC')
  AND measurement_start_time < toDateTime({{end:String}}, 'UTC')
  AND {_WELL_FORMED_CC}
GROUP BY hour, probe_cc
"""

STATUS_COLUMNS = (
    "hour",
    "probe_cc",
    "probe_asn",
    "domain",
    "measurements",
    *SHARE_COLUMNS.values(),
    "blocked_share",
    "state",
    "change",
    "s_pos",
    "s_neg",
    "last_measured",
    "update_time",
)

# The detector's memory at one hour: every series it still remembers.
STATE_AT_SQL = """
SELECT probe_cc, probe_asn, domain, toInt8(state) AS state, s_pos, s_neg,
       toInt64(toUnixTimestamp(last_measured) / 3600) AS last_measured
FROM blocking_status FINAL
WHERE hour = toDateTime({hour:String}, 'UTC')
"""

LAST_HOUR_BEFORE_SQL = """
SELECT max(hour) FROM blocking_status
WHERE hour < toDateTime({hour:String}, 'UTC')
  AND hour >= toDateTime({since:String}, 'UTC')
HAVING count() > 0
"""

LAST_HOUR_SQL = """
SELECT max(hour) FROM blocking_status
WHERE hour > toDateTime({hour:String}, 'UTC')
HAVING count() > 0
"""

# The hours an interrupted swap left to compute again (none: NULLs).
REDO_SQL = """
SELECT min(first_hour), max(last_hour) FROM blocking_status_redo HAVING count() > 0
"""

# The staging table a pass writes into; its days replace the live ones at the end (REPLACE PARTITION).
STATUS_STAGING = "blocking_status_tmp"

# Partitions of the live table a pass over [start, end] replaces: those holding rows
# of the range, and those the new rows went to (staging has the same partition key).
TOUCHED_PARTITIONS_SQL = f"""
SELECT DISTINCT _partition_id FROM blocking_status
WHERE hour >= toDateTime({{start:String}}, 'UTC') AND hour <= toDateTime({{end:String}}, 'UTC')
UNION DISTINCT
SELECT DISTINCT _partition_id FROM {STATUS_STAGING}
"""

# The live rows of those partitions outside [start, end]: copied into staging, so
# each partition is whole there before it replaces the live one.
KEEP_OUTSIDE_SQL = f"""
INSERT INTO {STATUS_STAGING}
SELECT * FROM blocking_status
WHERE _partition_id IN {{partitions:Array(String)}}
  AND (hour < toDateTime({{start:String}}, 'UTC') OR hour > toDateTime({{end:String}}, 'UTC'))
"""

# Partitions of staging that hold rows once it is complete.
STAGED_PARTITIONS_SQL = f"SELECT DISTINCT _partition_id FROM {STATUS_STAGING}"

# Blocking episodes of [start, end], grouped by ClickHouse: per (country, domain), the
# runs of consecutive hours with at least one network blocked (gaps and islands: an
# hour minus its rank is constant along a run). Only the episodes leave the engine.
BLOCKING_EPISODES_SQL = """
SELECT
    probe_cc,
    domain,
    min(hour_number) AS start,
    max(hour_number) AS last,
    argMin(up, hour_number) AS onset_up,
    max(blocked_networks) AS peak_networks,
    arraySort(groupUniqArrayArray(asns)) AS networks
FROM (
    SELECT *,
           hour_number - row_number() OVER (PARTITION BY probe_cc, domain ORDER BY hour_number)
               AS island
    FROM (
        SELECT probe_cc, domain,
               toInt64(toUnixTimestamp(hour) / 3600) AS hour_number,
               uniqExact(probe_asn) AS blocked_networks,
               max(change = 1) AS up,
               groupUniqArray(probe_asn) AS asns
        FROM blocking_status FINAL
        WHERE hour >= toDateTime({start:String}, 'UTC') AND hour <= toDateTime({end:String}, 'UTC')
          AND state = 'blocked'
        GROUP BY probe_cc, domain, hour_number
    )
)
GROUP BY probe_cc, domain, island
ORDER BY probe_cc, domain, start
"""

EVENT_COLUMNS = (
    "event_id",
    "kind",
    "probe_cc",
    "domain",
    "status",
    "onset",
    "start_hour",
    "end_hour",
    "networks",
    "peak_networks",
    "explorer_url",
    "first_detected",
    "updated",
    "announced",
    "version",
)

# Stored events that a recomputation from ``start`` may change: still open, or ended
# at or after it. Withdrawn ones are read too, so a re-detected event gets its id back.
EVENTS_FROM_SQL = f"""
SELECT {", ".join(EVENT_COLUMNS)}
FROM blocking_events FINAL
WHERE end_hour IS NULL OR end_hour >= toDateTime({{start:String}}, 'UTC')
"""

ALL_EVENTS_SQL = f"""
SELECT {", ".join(EVENT_COLUMNS)}
FROM blocking_events FINAL
"""

# What each consumer was told about each event.
CONSUMER_ANNOUNCED_SQL = """
SELECT consumer, event_id, toString(announced)
FROM blocking_consumer_announced FINAL
"""

# Which consumer watches which event domain: the watchlist exports' own match (the
# host as the engine normalises it, label by label against every spelling).
EVENT_CONSUMERS_SQL = f"""
SELECT DISTINCT r.domain, w.consumer
FROM {matching_sql("(SELECT arrayJoin({event_domains:Array(String)}) AS domain)")}
"""
