-- OONI's tables as OONI creates them, for tests: the live tables an operator's
-- server already holds when the project is pointed at it.
--
-- From ooni/devops scripts/cluster-migration/schema.sql (fastpath, citizenlab,
-- citizenlab_flip) and ooni/backend docs/Database.md (asnmeta, fingerprints_*),
-- with two changes only: `ON CLUSTER oonidata_cluster` removed and each
-- ReplicatedReplacingMergeTree('<keeper path>', '{replica}'[, ver]) replaced by
-- ReplacingMergeTree([ver]) (no Keeper runs here). Lines marked "operator" are what
-- an operator adds on top (a column the project does not know, a setting, a
-- comment): the project must keep them. Each addition is a line of its own, so the
-- DDL without them is OONI's (ooni_pipeline_tests.conftest.operator_ddl).

CREATE TABLE fastpath
(
    `measurement_uid` String,
    `report_id` String,
    `input` String,
    `probe_cc` LowCardinality(String),
    `probe_asn` Int32,
    `test_name` LowCardinality(String),
    `test_start_time` DateTime,
    `measurement_start_time` DateTime,
    `filename` String,
    `scores` String,
    `platform` String,
    `anomaly` String,
    `confirmed` String,
    `msm_failure` String,
    `domain` String,
    `software_name` String,
    `software_version` String,
    `control_failure` String,
    `blocking_general` Float32,
    `is_ssl_expected` Int8,
    `page_len` Int32,
    `page_len_ratio` Float32,
    `server_cc` String,
    `server_asn` Int8,
    `server_as_name` String,
    `update_time` DateTime64(3) MATERIALIZED now64(),
    `test_version` String,
    `architecture` String,
    `engine_name` LowCardinality(String),
    `engine_version` String,
    `test_runtime` Float32,
    `blocking_type` String,
    `test_helper_address` LowCardinality(String),
    `test_helper_type` LowCardinality(String),
    `ooni_run_link_id` Nullable(UInt64), -- newer: devops schema.sql, not docs/Database.md
    INDEX fastpath_rid_idx report_id TYPE minmax GRANULARITY 1,
    INDEX measurement_uid_idx measurement_uid TYPE minmax GRANULARITY 8
)
ENGINE = ReplacingMergeTree(update_time)
ORDER BY (measurement_start_time, report_id, input, measurement_uid)
SETTINGS index_granularity = 8192;

CREATE TABLE citizenlab
(
    `domain` String,
    `url` String,
    `cc` FixedString(32),
    `category_code` String
    , `added_by` LowCardinality(String) DEFAULT 'operator' COMMENT 'who added the row' -- operator
)
ENGINE = ReplacingMergeTree
ORDER BY (domain, url, cc, category_code)
SETTINGS index_granularity = 4
    , min_bytes_for_wide_part = 0 -- operator
COMMENT 'CitizenLab test lists, refreshed by ooni_pipeline' -- operator
;

CREATE TABLE citizenlab_flip
(
    `domain` String,
    `url` String,
    `cc` FixedString(32),
    `category_code` String
)
ENGINE = ReplacingMergeTree
ORDER BY (domain, url, cc, category_code)
SETTINGS index_granularity = 4;

CREATE TABLE fingerprints_dns
(
    `name` String,
    `scope` Enum8('nat' = 1, 'isp' = 2, 'prod' = 3, 'inst' = 4, 'vbw' = 5, 'fp' = 6),
    `other_names` String,
    `location_found` String,
    `pattern_type` Enum8('full' = 1, 'prefix' = 2, 'contains' = 3, 'regexp' = 4),
    `pattern` String,
    `confidence_no_fp` UInt8,
    `expected_countries` String,
    `source` String,
    `exp_url` String,
    `notes` String
    , `reviewed` UInt8 DEFAULT 0 -- operator
)
ENGINE = EmbeddedRocksDB
PRIMARY KEY name
COMMENT 'DNS fingerprints' -- operator
;

CREATE TABLE fingerprints_http
(
    `name` String,
    `scope` Enum8('nat' = 1, 'isp' = 2, 'prod' = 3, 'inst' = 4, 'vbw' = 5, 'fp' = 6, 'injb' = 7, 'prov' = 8),
    `other_names` String,
    `location_found` String,
    `pattern_type` Enum8('full' = 1, 'prefix' = 2, 'contains' = 3, 'regexp' = 4),
    `pattern` String,
    `confidence_no_fp` UInt8,
    `expected_countries` String,
    `source` String,
    `exp_url` String,
    `notes` String
)
ENGINE = EmbeddedRocksDB
PRIMARY KEY name;

CREATE TABLE asnmeta
(
    `asn` UInt32,
    `org_name` String,
    `cc` String,
    `changed` Date,
    `aut_name` String,
    `source` String
    , `loaded_at` DateTime DEFAULT now() -- operator
)
ENGINE = MergeTree
ORDER BY (asn, changed)
SETTINGS index_granularity = 8192
    , min_rows_for_wide_part = 0 -- operator
;
