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

# One UTC day of web_connectivity, one group per measurement (bound: start, end).
_DAY_OF_MEASUREMENTS = """
    FROM fastpath
    WHERE test_name = 'web_connectivity'
      AND measurement_start_time >= toDateTime({start:String}, 'UTC')
      AND measurement_start_time < toDateTime({end:String}, 'UTC')
    GROUP BY measurement_uid
"""


def category_sql(msm_failure: str, anomaly: str, blocking_type: str) -> str:
    """The contract's rule: failure, else a known blocking type, else anomaly, else accessible."""
    known = ", ".join(f"'{t}'" for t in BLOCKING_TYPES)
    return (
        f"multiIf({msm_failure} = 't', 'failure', "
        f"{anomaly} = 't' AND {blocking_type} IN ({known}), {blocking_type}, "
        f"{anomaly} = 't', 'anomaly', 'accessible')"
    )


# Latest version of each measurement of the day, with its category.
_MEASUREMENTS = f"""
SELECT
    measurement_uid,
    latest.1 AS start_time,
    latest.2 AS probe_asn,
    latest.3 AS input,
    latest.4 AS domain,
    latest.5 AS probe_cc,
    latest.6 = 't' AS is_confirmed,
    {category_sql("latest.7", "latest.8", "latest.9")} AS category
FROM (
    SELECT
        measurement_uid,
        argMax(
            (measurement_start_time, probe_asn, input, domain, toString(probe_cc),
             confirmed, msm_failure, anomaly, blocking_type),
            update_time
        ) AS latest
    {_DAY_OF_MEASUREMENTS}
)
"""

# The CSV's rows, in the contract's order (the header line comes from CSV_FORMAT).
PIVOT_SQL = f"""
SELECT
    formatDateTime(start_time, '%Y-%m-%d %H:%i:%S', 'UTC') AS measurement_start_time,
    probe_asn,
    input,
    domain,
    concat('{EXPLORER_URL_PREFIX}', measurement_uid) AS explorer_url,
    probe_cc,
    {", ".join(f"toUInt8(category = '{c}') AS `{c}`" for c in CATEGORIES)},
    toUInt8(is_confirmed) AS confirmed
FROM ({_MEASUREMENTS})
ORDER BY start_time, explorer_url
"""

# Text cells that come from probes (``input``, ``domain``, ``probe_cc``), written into
# CSVs that newsrooms open in spreadsheets: a cell starting with = + - @ (or a tab or
# carriage return) is a formula in Excel, LibreOffice and Google Sheets (OWASP, "CSV
# Injection"). As OWASP recommends, such a cell is written with a leading
# apostrophe, which makes a spreadsheet show it as text. A value already starting with
# an apostrophe gets one too, so that a program recovers every value exactly by
# removing one leading apostrophe where there is one. Ordinary URLs and country codes
# start with none of these; the Parquet exports keep every value as stored.
SPREADSHEET_TEXT_COLUMNS = ("input", "domain", "probe_cc")


def spreadsheet_safe(column: str) -> str:
    """SQL: ``column``'s value as a spreadsheet reads it as text (see above)."""
    return (
        f"if(match(`{column}`, '^[=+\\\\-@\\\\t\\\\r\\']'), concat('\\'', `{column}`), `{column}`)"
    )


def spreadsheet_select_list(columns: tuple[str, ...], aliased: bool = True) -> str:
    """``columns`` as a select list, probe text made spreadsheet-safe. Unaliased, an
    ``ORDER BY`` of the same query sorts on the stored values (a CSV without a
    header from the engine does not need the names)."""
    return ", ".join(
        (f"{spreadsheet_safe(c)} AS `{c}`" if aliased else spreadsheet_safe(c))
        if c in SPREADSHEET_TEXT_COLUMNS
        else f"`{c}`"
        for c in columns
    )


# The CSV's columns as a select list, probe text made spreadsheet-safe.
CSV_COLUMNS_SQL = spreadsheet_select_list(CSV_COLUMNS)


def csv_select(table_sql: str) -> str:
    """The CSV rows of the rows ``table_sql`` gives (``CSV_COLUMNS_SQL``)."""
    return f"SELECT {CSV_COLUMNS_SQL} FROM ({table_sql})"


# The contract's CSV written whole by the engine: ClickHouse's CSVWithNames quotes the
# header names, the contract's header is bare, so a Template of one header line and
# rows serialized by the CSV escaping rule (byte for byte what format CSV writes).
CSV_FORMAT = "Template"


def _literal(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


_TEMPLATE_SETTINGS = {
    "format_template_resultset_format": ",".join(CSV_COLUMNS) + "\n${data}",
    "format_template_row_format": ",".join(f'${{"{c}":CSV}}' for c in CSV_COLUMNS) + "\n",
    "format_template_rows_between_delimiter": "",
}
CSV_FORMAT_SETTINGS = ", ".join(f"{k} = {_literal(v)}" for k, v in _TEMPLATE_SETTINGS.items())
