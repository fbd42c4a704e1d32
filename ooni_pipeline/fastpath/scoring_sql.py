"""OONI's fastpath scoring of web_connectivity, as one ClickHouse query over raw postcan members.

Each rule cites ooni/backend ``fastpath/fastpath/core.py`` (commit 040e6ccd, the
last change to that file) or ``db.py``, which this query follows. The engine parses
each member's JSON (simdjson) and matches the fingerprint tables with its
Hyperscan (literal patterns): no measurement is parsed in Python.

Other test names (``OONI_PUBLIC_TEST_NAMES``) are read but not scored: they get what
``score_measurement`` gives a test name it has no rule for (every locality 0.0 and
``accuracy`` 0.0, so ``msm_failure = 't'``), never web_connectivity's rules.

Every member yields one staging row: either a fastpath row, or a ``skip_reason``
(``not_json``, ``yaml``, ``no_report_id``...), so skips are counted and shown.
"""

from __future__ import annotations

# Reasons that mean the member itself is malformed (counted against the 1% limit);
# the others are OONI's own discard rules (process_measurement).
MALFORMED_REASONS = ("not_json", "not_a_measurement", "bad_field")

# Fingerprint tables as constant arrays of named tuples (core.py prepare_fingerprints:
# expected_countries upper-cased, split on commas, "" and ZZ dropped, sorted).
_FINGERPRINT = (
    "Tuple(name String, scope String, location_found String, confidence_no_fp UInt8, "
    "expected_countries Array(String), pattern String)"
)
_HEADER_FINGERPRINT = _FINGERPRINT[:-1] + ", header String, pattern_type String)"
_EXPECTED_COUNTRIES = (
    "arraySort(arrayFilter(c -> c NOT IN ('', 'ZZ'), "
    "splitByChar(',', upper(replaceAll(expected_countries, ' ', '')))))"
)


def _fingerprints(
    alias: str, table: str, where: str, extra: str = "", type_: str = _FINGERPRINT
) -> str:
    return f"""
    (SELECT groupArray(CAST((name, toString(scope), {"'dns'" if table == "fingerprints_dns" else "location_found"},
                             confidence_no_fp, {_EXPECTED_COUNTRIES}, pattern{extra}), '{type_}'))
     FROM (SELECT * FROM {table} WHERE {where} ORDER BY name)) AS {alias}"""


_FINGERPRINTS = ",".join(
    (
        _fingerprints("dns_fps", "fingerprints_dns", "1"),
        _fingerprints("body_fps", "fingerprints_http", "location_found = 'body'"),
        # match_http_headers_fingerprints: only "full" and "prefix" header patterns are matched
        _fingerprints(
            "header_fps",
            "fingerprints_http",
            "startsWith(location_found, 'header.') AND pattern_type IN ('full', 'prefix')",
            extra=", substring(location_found, 8), toString(pattern_type)",
            type_=_HEADER_FINGERPRINT,
        ),
    )
)


# Body fingerprints are plain substrings (match_http_body_fingerprints), and header
# prefixes plain prefixes: all searched at once by Hyperscan as literal regexps, every
# ASCII punctuation character escaped. Measured on 2,000 bodies of 36 KB against OONI's
# 1,311 body fingerprints: 148.6 s with multiSearchAllPositions (one pass per needle),
# 130.5 s with multiSearchAny, 1.85 s with multiMatchAny.
def _escaped(fingerprints: str, text: str) -> str:
    """``text`` of each fingerprint as a Hyperscan literal."""
    return f"arrayMap(fp -> replaceRegexpAll({text}, '([!-/:-@\\\\[-`{{-~])', '\\\\\\\\\\\\1'), {fingerprints})"


_BODY_PATTERNS = _escaped("body_fps", "fp.pattern")
# "<header>\n<prefix>", anchored, matched against "<header>\n<value>"
_HEADER_PREFIX_PATTERNS = "arrayMap(p -> concat('^', p), {})".format(
    _escaped(
        "arrayFilter(fp -> fp.pattern_type = 'prefix', header_fps)",
        "concat(fp.header, '\\n', fp.pattern)",
    )
)


def _json_float(column: str) -> str:
    """A score as ujson writes it for fastpath's ``scores`` (``1.0``, not ``1``)."""
    return f"if({column} = floor({column}), concat(toString(toInt64({column})), '.0'), toString({column}))"


def scoring_select(source: str) -> str:
    """The SELECT producing staging rows from ``source``, a table whose rows have
    ``member_key`` (the postcan's key), ``member_name`` (the tar member's name) and
    ``raw`` (its bytes)."""
    return f"""
WITH
    {_FINGERPRINTS},
    {_BODY_PATTERNS} AS body_patterns,
    arrayDistinct(arrayMap(fp -> fp.header, header_fps)) AS header_names,
    arrayMap(fp -> concat(fp.header, '\n', fp.pattern), arrayFilter(fp -> fp.pattern_type = 'full', header_fps)) AS header_full_keys,
    {_HEADER_PREFIX_PATTERNS} AS header_prefix_patterns,
    ['tcp_ip', 'dns', 'http-diff', 'http-failure'] AS blocking_types
SELECT
    member_key, member_name, skip_reason,
    measurement_uid, report_id, input, probe_cc, probe_asn, test_name,
    test_start_time, measurement_start_time, filename, scores, platform,
    if(blocking_general > 0.5, 't', 'f') AS anomaly,
    if(is_confirmed, 't', 'f') AS confirmed,
    if(accuracy < 0.5, 't', 'f') AS msm_failure,
    domain, software_name, software_version, '' AS control_failure,
    toFloat32(blocking_general) AS blocking_general,
    toInt8(0) AS is_ssl_expected, toInt32(0) AS page_len, toFloat32(0) AS page_len_ratio,
    '' AS server_cc, toInt8(0) AS server_asn, '' AS server_as_name,
    test_version, architecture, engine_name, engine_version, test_runtime,
    blocking_type, test_helper_address, test_helper_type
FROM (
SELECT
    *,
    -- score_web_connectivity: blocking_general gets the confirmed localities added,
    -- unless title_match returned early.
    if(title_match_ok, bg_base + loc_country + loc_isp + loc_local, bg_confirmed) AS blocking_general,
    concat(
        '{{"blocking_general":', {_json_float("blocking_general")},
        ',"blocking_global":0.0,"blocking_country":', {_json_float("loc_country")},
        ',"blocking_isp":', {_json_float("loc_isp")},
        ',"blocking_local":', {_json_float("loc_local")},
        if(empty(matches), '', concat(',"fingerprints":', toJSONString(arrayMap(m -> CAST((m.name, m.scope, m.location_found, m.confidence_no_fp, m.expected_countries),
            'Tuple(name String, scope String, location_found String, confidence_no_fp UInt8, expected_countries Array(String))'), matches)))),
        if(is_confirmed, ',"confirmed":true', ''),
        if(blocking_type != '', concat(',"analysis":{{"blocking_type":', toJSONString(blocking_type), '}}'),
           if(unsupported_blocking AND title_match_ok, ',"analysis":{{"msg":"Unsupported blocking type"}}', '')),
        if(accuracy < 0.5, ',"accuracy":0.0', ''),
        if(date_msg != '', concat(',"msg":', toJSONString(date_msg)), ''),
        '}}') AS scores
FROM (
SELECT
    *,
    -- is_confirmed(): the probe's country is expected, or the scope is isp/nat
    arrayMap(m -> (probe_cc_upper != 'ZZ' AND has(m.expected_countries, probe_cc_upper)) OR m.scope IN ('isp', 'nat'), matches) AS confirmed_flags,
    arrayExists(x -> x, confirmed_flags) AS is_confirmed,
    -- FINGERPRINT_SCOPE_TO_LOCALITY: inst -> local, isp -> isp, nat -> country, others -> general
    if(arrayExists((m, c) -> c AND m.scope = 'nat', matches, confirmed_flags), 1., 0.) AS loc_country,
    if(arrayExists((m, c) -> c AND m.scope = 'isp', matches, confirmed_flags), 1., 0.) AS loc_isp,
    if(arrayExists((m, c) -> c AND m.scope = 'inst', matches, confirmed_flags), 1., 0.) AS loc_local,
    if(arrayExists((m, c) -> c AND m.scope NOT IN ('nat', 'isp', 'inst'), matches, confirmed_flags), 1., 0.) AS bg_confirmed,
    -- blocking in the four blocking types sets blocking_general to 1.0 (overwriting)
    if(blocking_type != '', 1., bg_confirmed) AS bg_base,
    NOT empty(matches) AS has_matches,
    multiIf(
        NOT scored_test, 0.,                                            -- score_measurement: unsupported test name
        test_keys_raw = 'null', 0.,                                     -- test_keys None
        base64_error, 0.,                                               -- score_web_connectivity_full: binascii.Error
        NOT title_match_ok, 0.,                                         -- title_match not in (True, False, None)
        blocking_raw IN ('', 'null') AND NOT has_matches, 0.,           -- blocking None, no fingerprint
        unsupported_blocking, 0.,                                       -- any other blocking value
        unknown_failure, 0.,                                            -- _detect_unknown_failure
        accessible_raw = 'null' AND NOT has_matches, 0.,                -- accessible present and None
        date_msg != '', 0.,                                             -- flag_measurements_with_wrong_date
        1.) AS accuracy
FROM (
SELECT
    *,
    -- a base64 body that does not decode drops every match (score_web_connectivity_full)
    if(base64_error OR test_keys_raw = 'null' OR NOT scored_test, [], arrayConcat(dns_matches, http_matches)) AS matches
FROM (
SELECT
    *,
    JSONExtractKeysAndValuesRaw(test_keys_raw) AS tk,
    arrayFirst(kv -> kv.1 = 'blocking', tk).2 AS blocking_raw,
    arrayFirst(kv -> kv.1 = 'accessible', tk).2 AS accessible_raw,
    arrayFirst(kv -> kv.1 = 'title_match', tk).2 AS title_match_raw,
    title_match_raw IN ('', 'null', 'true', 'false') AS title_match_ok,
    if(JSONType(blocking_raw) = 'String' AND has(blocking_types, JSONExtractString(blocking_raw)),
       JSONExtractString(blocking_raw), '') AS probe_blocking_type,
    if(title_match_ok AND test_keys_raw != 'null' AND scored_test, probe_blocking_type, '') AS blocking_type,
    scored_test AND blocking_raw NOT IN ('', 'null', 'false') AND probe_blocking_type = '' AS unsupported_blocking,
    arrayExists(kv -> endsWith(kv.1, '_failure') AND JSONType(kv.2) = 'String'
                      AND startsWith(JSONExtractString(kv.2), 'unknown_failure'), tk) AS unknown_failure,
    -- DNS: each answer's ipv4, else hostname, else ipv6, equal to a pattern
    arrayFlatten(arrayMap(q -> arrayMap(a -> multiIf(JSONHas(a, 'ipv4'), JSONExtractString(a, 'ipv4'),
                                                      JSONHas(a, 'hostname'), JSONExtractString(a, 'hostname'),
                                                      JSONHas(a, 'ipv6'), JSONExtractString(a, 'ipv6'), ''),
                                        JSONExtractArrayRaw(q, 'answers')),
                          JSONExtractArrayRaw(arrayFirst(kv -> kv.1 = 'queries', tk).2))) AS dns_answers,
    arrayFlatten(arrayMap(addr -> arrayFilter(fp -> fp.pattern = addr, dns_fps), dns_answers)) AS dns_matches,
    -- HTTP: each response of test_keys.requests, body then headers
    arrayFilter(r -> r NOT IN ('', 'null'),
                arrayMap(req -> JSONExtractRaw(req, 'response'),
                         JSONExtractArrayRaw(arrayFirst(kv -> kv.1 = 'requests', tk).2))) AS responses,
    arrayMap(r -> JSONExtractRaw(r, 'body'), responses) AS bodies_raw,
    arrayMap(b -> JSONType(b) = 'Object' AND JSONExtractString(b, 'format') = 'base64' AND JSONHas(b, 'data'), bodies_raw) AS is_base64,
    arrayExists((b, is64) -> is64 AND JSONExtractString(b, 'data') != ''
                             AND tryBase64Decode(JSONExtractString(b, 'data')) = '', bodies_raw, is_base64) AS base64_error,
    arrayMap((b, is64) -> multiIf(is64, tryBase64Decode(JSONExtractString(b, 'data')),
                                  JSONType(b) = 'String', JSONExtractString(b), ''), bodies_raw, is_base64) AS bodies,
    -- headers named by a fingerprint, as (lower-cased name, value if a string, value
    -- for prefixes: a string, or a base64 object decoded)
    arrayMap(r -> arrayFilter(h -> has(header_names, h.1), arrayMap(kv -> (
            lower(kv.1),
            if(JSONType(kv.2) = 'String', JSONExtractString(kv.2), ''),
            multiIf(JSONType(kv.2) = 'String', JSONExtractString(kv.2),
                    JSONType(kv.2) = 'Object' AND JSONExtractString(kv.2, 'format') = 'base64',
                        tryBase64Decode(JSONExtractString(kv.2, 'data')), '')),
        JSONExtractKeysAndValuesRaw(r, 'headers'))), responses) AS headers,
    arrayFlatten(arrayMap((body, hs) -> arrayConcat(
        if(body = '', [], arrayMap(i -> body_fps[i], arraySort(multiMatchAllIndices(body, body_patterns)))),
        -- a cheap test per header first (a set lookup, one Hyperscan pass); only a
        -- header that passes is compared with each header fingerprint
        arrayMap(i -> CAST((header_fps[i].name, header_fps[i].scope, header_fps[i].location_found,
                            header_fps[i].confidence_no_fp, header_fps[i].expected_countries, header_fps[i].pattern),
                           '{_FINGERPRINT}'),
            arraySort(arrayDistinct(arrayFlatten(arrayMap(h ->
                if(has(header_full_keys, concat(h.1, '\n', h.2))
                     OR multiMatchAny(concat(h.1, '\n', h.3), header_prefix_patterns),
                   arrayFilter(i -> header_fps[i].header = h.1
                                    AND if(header_fps[i].pattern_type = 'full', h.2 = header_fps[i].pattern,
                                           startsWith(h.3, header_fps[i].pattern)),
                               arrayEnumerate(header_fps)),
                   []), hs)))))),
        bodies, headers)) AS http_matches
FROM (
SELECT
    member_key, member_name, measurement_uid,
    multiIf(
        NOT envelope_ok, 'not_json',
        envelope_format = 'yaml', 'yaml',
        NOT is_measurement, 'not_a_measurement',
        report_id_raw IN ('', 'null'), 'no_report_id',                 -- report_id None
        probe_cc_upper = 'ZZ', 'probe_cc_zz',
        upper(JSONExtractString(probe_asn_raw)) = 'AS0', 'probe_asn_as0',
        probe_asn IS NULL OR measurement_start_time IS NULL OR test_start_time IS NULL
            OR NOT input_ok, 'bad_field',                               -- would raise in db.py
        '') AS skip_reason,
    JSONExtractString(report_id_raw) AS report_id,
    if(input_ok, JSONExtractString(input_raw), '') AS input,
    JSONExtractString(probe_cc_raw) AS probe_cc,
    probe_cc_upper,
    ifNull(probe_asn, 0) AS probe_asn,
    test_name,
    -- score_measurement: only web_connectivity is scored here; any other test name
    -- gets what core.py gives a test name it has no scoring for (init_scores and
    -- accuracy 0.0: msm_failure), never web_connectivity's fingerprint rules
    test_name = 'web_connectivity' AS scored_test,
    ifNull(test_start_time, toDateTime(0, 'UTC')) AS test_start_time,
    ifNull(measurement_start_time, toDateTime(0, 'UTC')) AS measurement_start_time,
    member_key AS filename,
    -- annotations (process_measurement): platform defaults to "unset"
    if(JSONType(annotations_raw, 'platform') = 'String', JSONExtractString(annotations_raw, 'platform'), 'unset') AS platform,
    JSONExtractString(annotations_raw, 'architecture') AS architecture,
    JSONExtractString(annotations_raw, 'engine_name') AS engine_name,
    JSONExtractString(annotations_raw, 'engine_version') AS engine_version,
    -- db.py extract_input_domain: urlparse(input).netloc
    extract(input, '^(?:[A-Za-z][A-Za-z0-9+.\\-]*:)?//([^/?#]*)') AS domain,
    JSONExtractString(m['software_name']) AS software_name,
    JSONExtractString(m['software_version']) AS software_version,
    JSONExtractString(m['test_version']) AS test_version,
    toFloat32(JSONExtractFloat(m['test_runtime'])) AS test_runtime,
    JSONExtractString(m['test_helpers'], 'backend', 'address') AS test_helper_address,
    JSONExtractString(m['test_helpers'], 'backend', 'type') AS test_helper_type,
    if(m['test_keys'] = '', '{{}}', m['test_keys']) AS test_keys_raw,
    -- flag_measurements_with_wrong_date: the uid's time (when OONI received it)
    -- more than 1 h before the start time, or more than 365 days after it
    if(startsWith(measurement_uid, '20') AND length(measurement_uid) >= 20
         AND measurement_start_time IS NOT NULL AND received IS NOT NULL,
       multiIf(dateDiff('second', measurement_start_time, received) < -3600, 'Measurement start time from the future',
               dateDiff('second', measurement_start_time, received) > 31536000, 'Measurement start time too old', ''),
       '') AS date_msg
FROM (
SELECT
    *,
    mapFromArrays(arrayMap(kv -> kv.1, top), arrayMap(kv -> kv.2, top)) AS m,
    JSONType(msm) = 'Object' AS is_measurement,
    m['report_id'] AS report_id_raw,
    m['probe_cc'] AS probe_cc_raw,
    m['probe_asn'] AS probe_asn_raw,
    m['input'] AS input_raw,
    m['annotations'] AS annotations_raw,
    upper(if(probe_cc_raw IN ('', 'null'), 'ZZ', JSONExtractString(probe_cc_raw))) AS probe_cc_upper,
    -- db.py: int(msm["probe_asn"][2:])
    if(match(JSONExtractString(probe_asn_raw), '^AS[0-9]{{1,10}}$'),
       toInt32OrNull(substring(JSONExtractString(probe_asn_raw), 3)), NULL) AS probe_asn,
    JSONType(input_raw) IN ('String', 'Null') OR input_raw = '' AS input_ok,
    JSONExtractString(m['test_name']) AS test_name,
    parseDateTimeOrNull(JSONExtractString(m['measurement_start_time']), '%Y-%m-%d %H:%i:%s', 'UTC') AS measurement_start_time,
    parseDateTimeOrNull(JSONExtractString(m['test_start_time']), '%Y-%m-%d %H:%i:%s', 'UTC') AS test_start_time,
    parseDateTime64BestEffortOrNull(substring(measurement_uid, 1, 21), 6, 'UTC') AS received
FROM (
SELECT
    *,
    if(is_wrapped, JSONExtractRaw(raw, 'content'), raw) AS msm,
    if(envelope_ok AND envelope_format != 'yaml', JSONExtractKeysAndValuesRaw(msm), []) AS top
FROM (
SELECT
    -- s3feeder.load_multiple: the uid is member.name.rsplit("/", 1)[1][:-5]
    member_key,
    member_name,
    substring(replaceRegexpOne(member_name, '^.*/', ''), 1, length(replaceRegexpOne(member_name, '^.*/', '')) - 5) AS measurement_uid,
    raw,
    isValidJSON(raw) AS envelope_ok,
    -- process_measurement / unwrap_msmt: {{"format": "json"|"yaml", "content": ...}}
    envelope_ok AND JSONType(raw) = 'Object' AND JSONHas(raw, 'content') AND JSONHas(raw, 'format') AS is_wrapped,
    if(is_wrapped, lower(JSONExtractString(raw, 'format')), 'json') AS envelope_format
FROM {source}
))))))))
"""
