"""Watchlists: each consumer's own daily ``website_metrics``, only its domains.

One asset per consumer of the watchlist file (``OONI_WATCHLISTS``, see
``watchlist_file``), ``watchlists/<consumer>``, daily partitioned, writing
``exports/watchlists/<consumer>/<YYYY-MM-DD>.csv.gz`` with exactly the
``website_metrics`` columns and rows: they are read from the day's stage of those
rows (``daily_consumers``), matched against all consumers' domains in one query,
then split by consumer.
"""

import itertools
from collections.abc import Iterator

import dagster as dg
import idna

from ooni_pipeline import settings
from ooni_pipeline.exports.publish import CsvRecords, IncompleteExportError
from ooni_pipeline.exports.watchlist_file import Consumer, load_consumers, load_watchlists
from ooni_pipeline.exports.website_metrics_sql import CSV_COLUMNS_SQL

WATCHLISTS_ENV = "OONI_WATCHLISTS"
KEY_PREFIX = "watchlists"
# Each consumer's rows together, in the website_metrics CSV's order.
ROW_ORDER = "consumer, measurement_start_time, explorer_url"


# The host a row's ``domain`` names, as the engine matches it: ``fastpath.domain`` is
# the URL's netloc as the probe sent it, so it may carry userinfo (``user@bbc.com``),
# a port (``www.bbc.com:443``), trailing dots (``bbc.com.``), surrounding spaces, any
# case, Unicode included (``WWW.BÜCHER.DE``), compatibility forms (fullwidth
# ``ｂｂｃ．ｃｏｍ``, ideographic full stops ``bbc。com``, decomposed ``bu\u0308cher``)
# and invalid UTF-8. UTS #46's mapping, as near as the engine has it: invalid bytes
# replaced (``normalizeUTF8NFKC`` raises on them), everything after the last ``@``
# (split before NFKC, so a fullwidth ``＠`` is no userinfo separator, as for a
# browser), the characters UTS #46 ignores (soft hyphen, zero-width spaces and
# joiners, word joiner, BOM) removed, NFKC, spaces trimmed, the full stops UTS #46
# maps to ``.`` mapped, without a trailing ``:port`` and dots, lowercased by Unicode
# rules. (The engine has no IDNA
# functions, so the watched side carries every spelling: ``pair_params``.)
ROW_HOST_SQL = (
    "lowerUTF8(replaceRegexpOne(replaceRegexpOne(replaceRegexpAll(trimBoth(normalizeUTF8NFKC("
    "replaceRegexpAll(arrayElement(splitByChar('@', toValidUTF8(domain)), -1), "
    "'[\\\\x{00AD}\\\\x{200B}-\\\\x{200D}\\\\x{2060}\\\\x{FEFF}]', ''))), '[。．｡]', '.'), "
    "':[0-9]*$', ''), '\\\\.+$', ''))"
)
# A watched domain is bound in every mix of IDNA and Unicode labels (a host may be
# ``bücher.xn--p1ai``) up to this many internationalised labels, 2**n spellings;
# beyond it, in the all-IDNA and all-Unicode spellings only.
MAX_MIXED_LABELS = 4


def watchlist_sql(table: str) -> str:
    """The rows of the stage ``table`` whose domain is, or is under, a watched domain,
    once per consumer watching it, led by the consumer's index.

    Label by label: each row's host (``ROW_HOST_SQL``) yields its suffixes at label
    boundaries (news.bbc.com: news.bbc.com, bbc.com, com), joined by hash on the
    watched domains, so "bbc.com" matches "news.bbc.com", never "notbbc.com" nor
    "bbc.com.evil.net", and the cost does not grow with the number of watched
    domains. The exported rows keep ``domain`` as stored. Bound: the pairs of consumer
    index and domain, as comma-separated lists (a validated domain holds no comma,
    and a plain String binds alike on both back ends)."""
    return f"""
SELECT w.consumer AS consumer, {CSV_COLUMNS_SQL}
FROM {matching_sql(table)}
ORDER BY {ROW_ORDER}
LIMIT 1 BY consumer, explorer_url
"""


def matching_sql(source: str) -> str:
    """The FROM clause of the match (``watchlist_sql``): the rows of ``source`` (a
    table or a subquery with a ``domain`` column) as ``r``, joined to the watching
    consumers' indices as ``w.consumer``; bound as ``pair_params`` says. Also used by
    the blocking detector for the events of each consumer's domains."""
    return f"""(
    SELECT *, arrayJoin(arrayMap(
        i -> arrayStringConcat(arraySlice(splitByChar('.', host), i), '.'),
        range(1, length(splitByChar('.', host)) + 1)
    )) AS suffix
    FROM (SELECT *, {ROW_HOST_SQL} AS host FROM {source})
) AS r
INNER JOIN (
    SELECT toUInt32(pair.1) AS consumer, pair.2 AS watched
    FROM (SELECT arrayJoin(arrayZip(splitByChar(',', {{consumers:String}}),
                                    splitByChar(',', {{domains:String}}))) AS pair)
) AS w ON r.suffix = w.watched"""


def asset_key(consumer: str) -> dg.AssetKey:
    return dg.AssetKey([KEY_PREFIX, consumer])


def object_key(consumer: str, day: str) -> str:
    return f"exports/watchlists/{consumer}/{day}.csv.gz"


def by_consumer(chunks: Iterator[bytes]) -> Iterator[tuple[int, Iterator[bytes]]]:
    """(consumer index, its CSV records without the index column), in order. A
    record without an index (an old server's error text, see ``publish.write_csv``)
    fails the consumer's object before it is published."""
    for index, group in itertools.groupby(
        map(_split_index, CsvRecords.split(chunks)), key=lambda pair: pair[0]
    ):
        yield index, (record for _, record in group)


def _split_index(record: bytes) -> tuple[int, bytes]:
    index, comma, rest = record.partition(b",")
    if not comma or not index.isdigit():
        raise IncompleteExportError(
            "a record of the watchlist stream has no consumer index (the server's error "
            "text?): not published, the previous objects are kept"
        )
    return int(index), rest


def pair_params(watchlists: dict[str, tuple[str, ...]], consumers: list[str]) -> dict[str, str]:
    """The bound parameters of ``watchlist_sql`` for ``consumers`` (indices into it).

    Each watched domain (lowercase IDNA, ``watchlist_file``) is listed in all its
    ``spellings``: a row's host may be spelled in IDNA, in Unicode or label by label
    in either (``xn--bcher-kva.de``, ``bücher.de``, ``bücher.xn--p1ai``)."""
    pairs = [
        (i, form) for i, c in enumerate(consumers) for d in watchlists[c] for form in spellings(d)
    ]
    return {
        "consumers": ",".join(str(i) for i, _ in pairs),
        "domains": ",".join(d for _, d in pairs),
    }


def spellings(domain: str) -> list[str]:
    """A lowercase IDNA domain as a host may spell it: each internationalised label
    in its IDNA or its Unicode form, every mix up to ``MAX_MIXED_LABELS`` such labels
    (then both uniform spellings only); the IDNA form first."""
    options = [dict.fromkeys((label, unicode_form(label))) for label in domain.split(".")]
    if sum(len(o) > 1 for o in options) > MAX_MIXED_LABELS:
        return list(dict.fromkeys((domain, unicode_form(domain))))
    return [".".join(labels) for labels in itertools.product(*options)]


def unicode_form(domain: str) -> str:
    """The Unicode spelling of a lowercase IDNA domain or label (itself when it has
    none, or when it is no valid IDNA)."""
    try:
        return idna.decode(domain)
    except (UnicodeError, ValueError):
        return domain


def watchlists_from_env() -> dict[str, tuple[str, ...]]:
    """The consumers of ``$OONI_WATCHLISTS`` (none when unset). Read when the code
    location loads: a wrong file fails the load, naming file and line."""
    path = settings.env(WATCHLISTS_ENV)
    return load_watchlists(path) if path else {}


def consumers_from_env() -> dict[str, Consumer]:
    """The consumers of ``$OONI_WATCHLISTS`` with their webhook variables (none when
    unset): what the blocking detector watches and alerts each consumer about."""
    path = settings.env(WATCHLISTS_ENV)
    return load_consumers(path) if path else {}
