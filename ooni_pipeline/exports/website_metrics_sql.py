"""The website-metrics pivot, computed entirely in ClickHouse.

One row per web_connectivity measurement of a UTC day, each ``measurement_uid``
once (the version with the latest ``update_time`` wins: ``fastpath`` is a
ReplacingMergeTree and unmerged duplicates exist). Each measurement falls in
exactly one category, which becomes a 0/1 count column.
"""

CSV_COLUMNS = (
    "measurement_start_time",
    "probe_asn",
    "input",
    "domain",
    "explorer_url",
    "probe_cc",
    "accessible",
    "dns",
    "tcp_ip",
    "http-diff",
    "http-failure",
    "anomaly",
    "failure",
    "confirmed",
)
CATEGORIES = ("accessible", "dns", "tcp_ip", "http-diff", "http-failure", "anomaly", "failure")
BLOCKING_TYPES = ("dns", "tcp_ip", "http-diff", "http-failure")
EXPLORER_URL_PREFIX = "https://explorer.ooni.org/m/"

# Latest version of each measurement of the day, with its category.
_MEASUREMENTS = """
SELECT
    measurement_uid,
    latest.1 AS start_time,
    latest.2 AS probe_asn,
    latest.3 AS input,
    latest.4 AS domain,
    latest.5 AS probe_cc,
    latest.6 = 't' AS is_confirmed,
    multiIf(
        latest.7 = 't', 'failure',
        latest.8 = 't' AND latest.9 IN ('dns', 'tcp_ip', 'http-diff', 'http-failure'), latest.9,
        latest.8 = 't', 'anomaly',
        'accessible'
    ) AS category
FROM (
    SELECT
        measurement_uid,
        argMax(
            (measurement_start_time, probe_asn, input, domain, toString(probe_cc),
             confirmed, msm_failure, anomaly, blocking_type),
            update_time
        ) AS latest
    FROM fastpath
    WHERE test_name = 'web_connectivity'
      AND measurement_start_time >= toDateTime({start:String}, 'UTC')
      AND measurement_start_time < toDateTime({end:String}, 'UTC')
    GROUP BY measurement_uid
)
"""

# The CSV body, without header (written separately: chdb repeats *WithNames
# headers in every streamed chunk).
PIVOT_SQL = f"""
SELECT
    formatDateTime(start_time, '%Y-%m-%d %H:%i:%S', 'UTC') AS measurement_start_time,
    probe_asn,
    input,
    domain,
    concat('{EXPLORER_URL_PREFIX}', measurement_uid) AS explorer_url,
    probe_cc,
    toUInt8(category = 'accessible') AS accessible,
    toUInt8(category = 'dns') AS dns,
    toUInt8(category = 'tcp_ip') AS tcp_ip,
    toUInt8(category = 'http-diff') AS `http-diff`,
    toUInt8(category = 'http-failure') AS `http-failure`,
    toUInt8(category = 'anomaly') AS anomaly,
    toUInt8(category = 'failure') AS failure,
    toUInt8(is_confirmed) AS confirmed
FROM ({_MEASUREMENTS})
ORDER BY start_time, explorer_url
"""

# Totals of the same rows, for metadata and for the check. Only what the totals
# need goes through the dedup (a small argMax state), so this costs a fraction of
# the export itself.
TOTALS_SQL = """
SELECT
    count() AS rows,
    countIf(category = 'accessible') AS accessible,
    countIf(category = 'dns') AS dns,
    countIf(category = 'tcp_ip') AS tcp_ip,
    countIf(category = 'http-diff') AS `http-diff`,
    countIf(category = 'http-failure') AS `http-failure`,
    countIf(category = 'anomaly') AS anomaly,
    countIf(category = 'failure') AS failure,
    countIf(latest.4 = 't') AS confirmed,
    uniqExact(latest.5) AS countries,
    topK(10)(latest.5) AS top_countries
FROM (
    SELECT
        argMax((msm_failure, anomaly, blocking_type, confirmed, toString(probe_cc)), update_time) AS latest,
        multiIf(
            latest.1 = 't', 'failure',
            latest.2 = 't' AND latest.3 IN ('dns', 'tcp_ip', 'http-diff', 'http-failure'), latest.3,
            latest.2 = 't', 'anomaly',
            'accessible'
        ) AS category
    FROM fastpath
    WHERE test_name = 'web_connectivity'
      AND measurement_start_time >= toDateTime({start:String}, 'UTC')
      AND measurement_start_time < toDateTime({end:String}, 'UTC')
    GROUP BY measurement_uid
)
"""
