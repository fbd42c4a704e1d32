"""OONI's fastpath scoring of web_connectivity, as one ClickHouse query over raw postcan members.

Each rule cites ooni/backend ``fastpath/fastpath/core.py`` (commit 040e6ccd, the
last change to that file) or ``db.py``, which this query follows. The engine parses
each member's JSON (simdjson) and matches the fingerprint tables with its
Hyperscan (literal patterns): no measurement is parsed in Python.

Parsing a member is most of the cost, so a member is parsed once, into typed columns
(``JSONExtract`` into one named tuple: the few fields the rules read, every scalar
as ``Dynamic`` so its JSON type is known), and scored from those. That reading agrees
with the member's text for every member shaped as OONI's measurements are; a member
it could misread (an array where an object belongs, escaped letters in its keys, a
value of a type no probe writes) is recognised by its text or its types and parsed
the way this query always did instead: by ``JSONExtract*Raw`` one level at a time,
re-reading the JSON at each level (``_raw_parse``; about ten times the work). Both
readings hand the same columns to one scoring stage, and
``ooni_pipeline_tests/test_fastpath.py`` checks that they agree.

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
# "\n<header>\n<prefix>", found in a response's "\n<header>\n<value>" lines when a
# value may start with a prefix (then each header is compared exactly). One Hyperscan
# pass per response: a pass per header cost 1.2 s for 36,000 headers (the patterns
# were compiled again in a lambda inside a lambda).
_HEADER_PREFIX_PATTERNS = "arrayMap(p -> concat('\\n', p), {})".format(
    _escaped(
        "arrayFilter(fp -> fp.pattern_type = 'prefix', header_fps)",
        "concat(fp.header, '\n', fp.pattern)",
    )
)

# What the typed reading takes from a member ({"format": ..., "content": measurement}):
# Nullable(String) where the rules only read JSONExtractString's text (the same text
# for any JSON type, NULL for null or missing), Dynamic where they ask the JSON type,
# maps where they ask which keys exist or an object must not be read as an array.
MEMBER_TYPE = " ".join(
    """Tuple(format Nullable(String), content Tuple(
    report_id Nullable(String), probe_cc Nullable(String), probe_asn Nullable(String),
    input Dynamic, annotations Map(String, Dynamic),
    test_name Nullable(String), measurement_start_time Nullable(String),
    test_start_time Nullable(String), software_name Nullable(String),
    software_version Nullable(String), test_version Nullable(String), test_runtime Dynamic,
    test_helpers Map(String, Map(String, Nullable(String))),
    test_keys Tuple(blocking Dynamic, accessible Dynamic, title_match Dynamic,
        queries Array(Tuple(answers Array(Map(String, Nullable(String))))),
        requests Array(Tuple(response Tuple(body Dynamic, headers Map(String, Dynamic)))))))""".split()
)
# A string in a Dynamic stays a String (not a Date or DateTime guessed from its text).
# Every expression is computed for every row: with short-circuit evaluation, an
# expression shared by the lazily computed arguments of AND / if (the parsed member)
# was computed again for each of them (measured: 22 s instead of 5 s for 60,000
# members). The few costly questions asked of some members only get '' for the others.
SCORING_QUERY_SETTINGS = (
    "input_format_try_infer_dates = 0, input_format_try_infer_datetimes = 0, "
    "short_circuit_function_evaluation = 'disable'"
)

# Texts that send a member to the raw reading (one Hyperscan pass over the member): an
# array where the typed reading expects an object (JSONExtract would read it by
# position); "unknown_failure", after which every "*_failure" key must be checked. A key
# spelled with \u escapes escapes these texts (no probe writes one; looking for such
# escapes too cost more than the rest of the pass, as bodies are full of backslashes).
_IRREGULAR_TEXTS = (
    r"'\"(content|test_keys|response)\"[ \\t\\n\\r]*:[ \\t\\n\\r]*\\[', 'unknown_failure'"
)


def _str(value: str) -> str:
    """A Dynamic's string ('' when it holds another type)."""
    return f"ifNull(dynamicElement({value}, 'String'), '')"


def _field(value: str, name: str) -> str:
    """Field ``name`` of a Dynamic holding a JSON object (a Dynamic itself)."""
    return f"getSubcolumn(dynamicElement({value}, 'JSON'), '{name}')"


def _base64_object(value: str) -> str:
    """A body or header value of the form {"format": "base64", "data": ...}."""
    return f"(dynamicType({value}) = 'JSON' AND {_str(_field(value, 'format'))} = 'base64')"


def _typed_parse(source: str, typed_reading: bool) -> str:
    """Every member parsed once; ``fast`` when the typed reading can be trusted (else
    ``slow_raw`` carries the member to ``_raw_parse``), then the scoring columns from
    the typed reading, ``t_``-prefixed. ``typed_reading`` False: every member the raw
    way (the reference the typed reading is tested against)."""
    content = "j.content"
    tk = "j.content.test_keys"
    answers = "q.answers"
    return f"""
SELECT
    *,
    -- annotations (process_measurement): platform defaults to "unset"
    if(dynamicType(ann['platform']) = 'String', {_str("ann['platform']")}, 'unset') AS t_platform,
    {_str("ann['architecture']")} AS t_architecture,
    {_str("ann['engine_name']")} AS t_engine_name,
    {_str("ann['engine_version']")} AS t_engine_version,
    ifNull({content}.report_id, '') AS t_report_id,
    ifNull({content}.probe_cc, '') AS t_probe_cc,
    upper(ifNull({content}.probe_cc, 'ZZ')) AS t_probe_cc_upper,
    ifNull({content}.probe_asn, '') AS t_probe_asn_text,
    dynamicType({content}.input) IN ('String', 'None') AS t_input_ok,
    {_str(f"{content}.input")} AS t_input,
    ifNull({content}.test_name, '') AS t_test_name,
    ifNull({content}.measurement_start_time, '') AS t_measurement_start_text,
    ifNull({content}.test_start_time, '') AS t_test_start_text,
    ifNull({content}.software_name, '') AS t_software_name,
    ifNull({content}.software_version, '') AS t_software_version,
    ifNull({content}.test_version, '') AS t_test_version,
    -- JSONExtractFloat: a number as it is, anything else 0 (a string goes the raw way)
    multiIf(dynamicType({content}.test_runtime) = 'Float64', dynamicElement({content}.test_runtime, 'Float64'),
            dynamicType({content}.test_runtime) = 'Int64', toFloat64(dynamicElement({content}.test_runtime, 'Int64')),
            dynamicType({content}.test_runtime) = 'UInt64', toFloat64(dynamicElement({content}.test_runtime, 'UInt64')),
            0.) AS t_test_runtime,
    ifNull({content}.test_helpers['backend']['address'], '') AS t_test_helper_address,
    ifNull({content}.test_helpers['backend']['type'], '') AS t_test_helper_type,
    dynamicType({tk}.blocking) = 'None' AS t_blocking_null,
    if(dynamicType({tk}.blocking) = 'String' AND has(blocking_types, {_str(f"{tk}.blocking")}),
       {_str(f"{tk}.blocking")}, '') AS t_probe_blocking_type,
    NOT (dynamicType({tk}.blocking) = 'None'
         OR (dynamicType({tk}.blocking) = 'Bool' AND NOT dynamicElement({tk}.blocking, 'Bool'))) AS t_blocking_set,
    dynamicType({tk}.title_match) IN ('None', 'Bool') AS t_title_match_ok,
    -- a member saying unknown_failure is read the raw way (every "*_failure" key)
    false AS t_unknown_failure,
    -- whether accessible is there and null, or missing, is asked of the member's text
    -- when it is either and blocking is not None (when it can matter; others ask '')
    JSONHas(if(fast AND dynamicType({tk}.accessible) = 'None' AND NOT t_blocking_null, raw, ''),
            'content', 'test_keys', 'accessible') AS t_accessible_null,
    arrayFlatten(arrayMap(q -> arrayMap(a -> multiIf(mapContains(a, 'ipv4'), ifNull(a['ipv4'], ''),
                                                     mapContains(a, 'hostname'), ifNull(a['hostname'], ''),
                                                     mapContains(a, 'ipv6'), ifNull(a['ipv6'], ''), ''),
                                        {answers}),
                          {tk}.queries)) AS t_dns_answers,
    arrayMap(r -> r.response.body, {tk}.requests) AS t_body_values,
    arrayMap(b -> {_base64_object("b")} AND dynamicType({_field("b", "data")}) = 'String', t_body_values) AS t_is_base64,
    arrayExists((b, is64) -> is64 AND {_str(_field("b", "data"))} != ''
                             AND tryBase64Decode({_str(_field("b", "data"))}) = '', t_body_values, t_is_base64) AS t_base64_error,
    arrayMap((b, is64) -> multiIf(is64, tryBase64Decode({_str(_field("b", "data"))}),
                                  dynamicType(b) = 'String', {_str("b")}, ''), t_body_values, t_is_base64) AS t_bodies,
    arrayMap(r -> arrayFilter(h -> has(header_names, h.1), arrayMap((k, v) -> (
            lower(k),
            {_str("v")},
            multiIf(dynamicType(v) = 'String', {_str("v")},
                    {_base64_object("v")}, tryBase64Decode({_str(_field("v", "data"))}), '')),
        mapKeys(r.response.headers), mapValues(r.response.headers))), {tk}.requests) AS t_headers
FROM (
SELECT
    *,
    {content}.annotations AS ann,
    {int(typed_reading)} AND startsWith(raw, '{{')
        AND NOT multiMatchAny(raw, [{_IRREGULAR_TEXTS}])
        -- a wrapped measurement: {{"format": not yaml, "content": {{"report_id": ...}}}}
        AND j.format IS NOT NULL AND lower(j.format) != 'yaml' AND {content}.report_id IS NOT NULL
        -- values of a type no probe writes, whose text the raw reading gives
        AND dynamicType({content}.test_runtime) != 'String'
        AND arrayAll(k -> dynamicType(ann[k]) IN ('String', 'None'), ['architecture', 'engine_name', 'engine_version'])
        AND NOT arrayExists(r -> arrayExists(v -> {_base64_object("v")} AND dynamicType({_field("v", "data")}) NOT IN ('String', 'None'),
                                             arrayPushBack(mapValues(r.response.headers), r.response.body)),
                            {tk}.requests) AS fast,
    if(fast, '', raw) AS slow_raw
FROM (
SELECT
    member_key,
    member_name,
    raw,
    JSONExtract(raw, '{MEMBER_TYPE}') AS j
FROM {source}
))"""


def _raw_parse(inner: str) -> str:
    """The scoring columns, ``r_``-prefixed, from ``slow_raw`` read level by level
    (empty for a member the typed reading took), over the rows of ``inner``."""
    return f"""
SELECT
    *,
    JSONExtractKeysAndValuesRaw(r_test_keys_raw) AS tk,
    arrayFirst(kv -> kv.1 = 'blocking', tk).2 AS blocking_raw,
    arrayFirst(kv -> kv.1 = 'accessible', tk).2 AS accessible_raw,
    arrayFirst(kv -> kv.1 = 'title_match', tk).2 AS title_match_raw,
    r_test_keys_raw = 'null' AS r_test_keys_null,
    blocking_raw IN ('', 'null') AS r_blocking_null,
    title_match_raw IN ('', 'null', 'true', 'false') AS r_title_match_ok,
    if(JSONType(blocking_raw) = 'String' AND has(blocking_types, JSONExtractString(blocking_raw)),
       JSONExtractString(blocking_raw), '') AS r_probe_blocking_type,
    blocking_raw NOT IN ('', 'null', 'false') AS r_blocking_set,
    accessible_raw = 'null' AS r_accessible_null,
    arrayExists(kv -> endsWith(kv.1, '_failure') AND JSONType(kv.2) = 'String'
                      AND startsWith(JSONExtractString(kv.2), 'unknown_failure'), tk) AS r_unknown_failure,
    -- DNS: each answer's ipv4, else hostname, else ipv6
    arrayFlatten(arrayMap(q -> arrayMap(a -> multiIf(JSONHas(a, 'ipv4'), JSONExtractString(a, 'ipv4'),
                                                      JSONHas(a, 'hostname'), JSONExtractString(a, 'hostname'),
                                                      JSONHas(a, 'ipv6'), JSONExtractString(a, 'ipv6'), ''),
                                        JSONExtractArrayRaw(q, 'answers')),
                          JSONExtractArrayRaw(arrayFirst(kv -> kv.1 = 'queries', tk).2))) AS r_dns_answers,
    -- HTTP: each response of test_keys.requests, body then headers
    arrayFilter(r -> r NOT IN ('', 'null'),
                arrayMap(req -> JSONExtractRaw(req, 'response'),
                         JSONExtractArrayRaw(arrayFirst(kv -> kv.1 = 'requests', tk).2))) AS responses,
    arrayMap(r -> JSONExtractRaw(r, 'body'), responses) AS bodies_raw,
    arrayMap(b -> JSONType(b) = 'Object' AND JSONExtractString(b, 'format') = 'base64' AND JSONHas(b, 'data'), bodies_raw) AS is_base64,
    arrayExists((b, is64) -> is64 AND JSONExtractString(b, 'data') != ''
                             AND tryBase64Decode(JSONExtractString(b, 'data')) = '', bodies_raw, is_base64) AS r_base64_error,
    arrayMap((b, is64) -> multiIf(is64, tryBase64Decode(JSONExtractString(b, 'data')),
                                  JSONType(b) = 'String', JSONExtractString(b), ''), bodies_raw, is_base64) AS r_bodies,
    -- headers named by a fingerprint, as (lower-cased name, value if a string, value
    -- for prefixes: a string, or a base64 object decoded)
    arrayMap(r -> arrayFilter(h -> has(header_names, h.1), arrayMap(kv -> (
            lower(kv.1),
            if(JSONType(kv.2) = 'String', JSONExtractString(kv.2), ''),
            multiIf(JSONType(kv.2) = 'String', JSONExtractString(kv.2),
                    JSONType(kv.2) = 'Object' AND JSONExtractString(kv.2, 'format') = 'base64',
                        tryBase64Decode(JSONExtractString(kv.2, 'data')), '')),
        JSONExtractKeysAndValuesRaw(r, 'headers'))), responses) AS r_headers
FROM (
SELECT
    *,
    multiIf(
        NOT envelope_ok, 'not_json',
        envelope_format = 'yaml', 'yaml',
        NOT is_measurement, 'not_a_measurement',
        report_id_raw IN ('', 'null'), 'no_report_id',                 -- report_id None
        '') AS r_skip_reason,
    JSONExtractString(report_id_raw) AS r_report_id,
    JSONExtractString(probe_cc_raw) AS r_probe_cc,
    upper(if(probe_cc_raw IN ('', 'null'), 'ZZ', JSONExtractString(probe_cc_raw))) AS r_probe_cc_upper,
    JSONExtractString(probe_asn_raw) AS r_probe_asn_text,
    JSONType(input_raw) IN ('String', 'Null') OR input_raw = '' AS r_input_ok,
    if(r_input_ok, JSONExtractString(input_raw), '') AS r_input,
    JSONExtractString(m['test_name']) AS r_test_name,
    JSONExtractString(m['measurement_start_time']) AS r_measurement_start_text,
    JSONExtractString(m['test_start_time']) AS r_test_start_text,
    if(JSONType(annotations_raw, 'platform') = 'String', JSONExtractString(annotations_raw, 'platform'), 'unset') AS r_platform,
    JSONExtractString(annotations_raw, 'architecture') AS r_architecture,
    JSONExtractString(annotations_raw, 'engine_name') AS r_engine_name,
    JSONExtractString(annotations_raw, 'engine_version') AS r_engine_version,
    JSONExtractString(m['software_name']) AS r_software_name,
    JSONExtractString(m['software_version']) AS r_software_version,
    JSONExtractString(m['test_version']) AS r_test_version,
    JSONExtractFloat(m['test_runtime']) AS r_test_runtime,
    JSONExtractString(m['test_helpers'], 'backend', 'address') AS r_test_helper_address,
    JSONExtractString(m['test_helpers'], 'backend', 'type') AS r_test_helper_type,
    if(m['test_keys'] = '', '{{}}', m['test_keys']) AS r_test_keys_raw
FROM (
SELECT
    *,
    mapFromArrays(arrayMap(kv -> kv.1, top), arrayMap(kv -> kv.2, top)) AS m,
    JSONType(msm) = 'Object' AS is_measurement,
    m['report_id'] AS report_id_raw,
    m['probe_cc'] AS probe_cc_raw,
    m['probe_asn'] AS probe_asn_raw,
    m['input'] AS input_raw,
    m['annotations'] AS annotations_raw
FROM (
SELECT
    *,
    if(is_wrapped, JSONExtractRaw(slow_raw, 'content'), slow_raw) AS msm,
    if(envelope_ok AND envelope_format != 'yaml', JSONExtractKeysAndValuesRaw(msm), []) AS top
FROM (
SELECT
    *,
    isValidJSON(slow_raw) AS envelope_ok,
    -- process_measurement / unwrap_msmt: {{"format": "json"|"yaml", "content": ...}}
    envelope_ok AND JSONType(slow_raw) = 'Object' AND JSONHas(slow_raw, 'content') AND JSONHas(slow_raw, 'format') AS is_wrapped,
    if(is_wrapped, lower(JSONExtractString(slow_raw, 'format')), 'json') AS envelope_format
FROM ({inner})
))))"""


def _json_float(column: str) -> str:
    """A score as ujson writes it for fastpath's ``scores`` (``1.0``, not ``1``)."""
    return f"if({column} = floor({column}), concat(toString(toInt64({column})), '.0'), toString({column}))"


# The scoring columns both readings give, taken from the typed one when it was trusted.
_MERGED = (
    "report_id",
    "probe_cc",
    "probe_cc_upper",
    "probe_asn_text",
    "input_ok",
    "input",
    "test_name",
    "measurement_start_text",
    "test_start_text",
    "platform",
    "architecture",
    "engine_name",
    "engine_version",
    "software_name",
    "software_version",
    "test_version",
    "test_runtime",
    "test_helper_address",
    "test_helper_type",
    "blocking_null",
    "probe_blocking_type",
    "blocking_set",
    "title_match_ok",
    "unknown_failure",
    "accessible_null",
    "dns_answers",
    "base64_error",
    "bodies",
    "headers",
)


def scoring_select(source: str, *, typed_reading: bool = True) -> str:
    """The SELECT producing staging rows from ``source``, a table whose rows have
    ``member_key`` (the postcan's key), ``member_name`` (the tar member's name) and
    ``raw`` (its bytes). Run it with ``SCORING_QUERY_SETTINGS``. ``typed_reading``
    False reads every member the raw way (for tests)."""
    merged = ",\n    ".join(f"if(fast, t_{c}, r_{c}) AS {c}" for c in _MERGED)
    return f"""
WITH
    {_FINGERPRINTS},
    {_BODY_PATTERNS} AS body_patterns,
    arrayDistinct(arrayMap(fp -> fp.pattern, dns_fps)) AS dns_patterns,
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
    test_version, architecture, engine_name, engine_version, toFloat32(test_runtime) AS test_runtime,
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
        test_keys_null, 0.,                                             -- test_keys None
        base64_error, 0.,                                               -- score_web_connectivity_full: binascii.Error
        NOT title_match_ok, 0.,                                         -- title_match not in (True, False, None)
        blocking_null AND NOT has_matches, 0.,                          -- blocking None, no fingerprint
        unsupported_blocking, 0.,                                       -- any other blocking value
        unknown_failure, 0.,                                            -- _detect_unknown_failure
        accessible_null AND NOT has_matches, 0.,                        -- accessible present and None
        date_msg != '', 0.,                                             -- flag_measurements_with_wrong_date
        1.) AS accuracy
FROM (
SELECT
    *,
    if(title_match_ok AND NOT test_keys_null AND scored_test, probe_blocking_type, '') AS blocking_type,
    scored_test AND blocking_set AND probe_blocking_type = '' AS unsupported_blocking,
    -- each answer looked up among the distinct patterns (no lambda over every
    -- fingerprint per answer), then the fingerprints of the patterns found, in order
    arrayFlatten(arrayMap(k -> arrayFilter(fp -> fp.pattern = dns_patterns[k], dns_fps),
                          arrayFilter(k -> k > 0, arrayMap(addr -> indexOf(dns_patterns, addr), dns_answers)))) AS dns_matches,
    arrayFlatten(arrayMap((body_hits, hs, header_candidate) -> arrayConcat(
        arrayMap(i -> body_fps[i], body_hits),
        -- a header is compared with each header fingerprint only in a response that may match
        arrayMap(i -> CAST((header_fps[i].name, header_fps[i].scope, header_fps[i].location_found,
                            header_fps[i].confidence_no_fp, header_fps[i].expected_countries, header_fps[i].pattern),
                           '{_FINGERPRINT}'),
            arraySort(arrayDistinct(arrayFlatten(arrayMap(h ->
                arrayFilter(i -> header_fps[i].header = h.1
                                 AND if(header_fps[i].pattern_type = 'full', h.2 = header_fps[i].pattern,
                                        startsWith(h.3, header_fps[i].pattern)),
                            if(header_candidate, arrayEnumerate(header_fps), [])), hs)))))),
        arrayMap(body -> arraySort(multiMatchAllIndices(body, body_patterns)), bodies),
        headers,
        -- a cheap test per response first: a set lookup, one Hyperscan pass
        arrayMap((hs, lines) -> hasAny(header_full_keys, arrayMap(h -> concat(h.1, '\n', h.2), hs))
                                OR multiMatchAny(lines, header_prefix_patterns),
                 headers, arrayMap(hs -> arrayStringConcat(arrayMap(h -> concat('\n', h.1, '\n', h.3), hs)), headers)))) AS http_matches,
    -- a base64 body that does not decode drops every match (score_web_connectivity_full)
    if(base64_error OR test_keys_null OR NOT scored_test, [], arrayConcat(dns_matches, http_matches)) AS matches
FROM (
SELECT
    *,
    multiIf(
        NOT fast AND r_skip_reason != '', r_skip_reason,
        probe_cc_upper = 'ZZ', 'probe_cc_zz',
        upper(probe_asn_text) = 'AS0', 'probe_asn_as0',
        probe_asn IS NULL OR measurement_start_time IS NULL OR test_start_time IS NULL
            OR NOT input_ok, 'bad_field',                               -- would raise in db.py
        '') AS skip_reason,
    -- db.py: int(msm["probe_asn"][2:])
    if(match(probe_asn_text, '^AS[0-9]{{1,10}}$'), toInt32OrNull(substring(probe_asn_text, 3)), NULL) AS probe_asn_parsed,
    ifNull(probe_asn_parsed, 0) AS probe_asn,
    parseDateTimeOrNull(measurement_start_text, '%Y-%m-%d %H:%i:%s', 'UTC') AS measurement_start_parsed,
    parseDateTimeOrNull(test_start_text, '%Y-%m-%d %H:%i:%s', 'UTC') AS test_start_parsed,
    ifNull(test_start_parsed, toDateTime(0, 'UTC')) AS test_start_time,
    ifNull(measurement_start_parsed, toDateTime(0, 'UTC')) AS measurement_start_time,
    -- score_measurement: only web_connectivity is scored here; any other test name
    -- gets what core.py gives a test name it has no scoring for (init_scores and
    -- accuracy 0.0: msm_failure), never web_connectivity's fingerprint rules
    test_name = 'web_connectivity' AS scored_test,
    member_key AS filename,
    -- db.py extract_input_domain: urlparse(input).netloc
    extract(input, '^(?:[A-Za-z][A-Za-z0-9+.\\-]*:)?//([^/?#]*)') AS domain,
    -- flag_measurements_with_wrong_date: the uid's time (when OONI received it)
    -- more than 1 h before the start time, or more than 365 days after it
    parseDateTime64BestEffortOrNull(substring(measurement_uid, 1, 21), 6, 'UTC') AS received,
    if(startsWith(measurement_uid, '20') AND length(measurement_uid) >= 20
         AND measurement_start_parsed IS NOT NULL AND received IS NOT NULL,
       multiIf(dateDiff('second', measurement_start_parsed, received) < -3600, 'Measurement start time from the future',
               dateDiff('second', measurement_start_parsed, received) > 31536000, 'Measurement start time too old', ''),
       '') AS date_msg
FROM (
SELECT
    *,
    -- s3feeder.load_multiple: the uid is member.name.rsplit("/", 1)[1][:-5]
    substring(replaceRegexpOne(member_name, '^.*/', ''), 1, length(replaceRegexpOne(member_name, '^.*/', '')) - 5) AS measurement_uid,
    NOT fast AND r_test_keys_null AS test_keys_null,
    {merged}
FROM ({_raw_parse(_typed_parse(source, typed_reading))})
)))))
"""
