"""Benchmark: backing up a 12-month fastpath to S3 (a moto server on 127.0.0.1).

Run by hand from the repository root (several minutes):

    .venv/bin/python bench/bench_backup.py [--rows 6000000] [--repeat 1]

The same chdb data, the same objects (one zstd CSVWithNames per month), three ways,
each in its own process (peak RSS: the child's VmHWM, see harness.py; temporary bytes
sampled every 0.1 s in the process's own TMPDIR):
  ours        the backup asset's path: stream from ClickHouse through zstd into a
              multipart upload, no temporary file
  clickhouse  (a) ClickHouse's own INSERT INTO FUNCTION s3(...) per month
  old         (b) the old tool: dump each month through zstd into a temporary file,
              then boto3 upload_file
Targets: ours <= 1.5x (a) wall time, faster than (b), zero temporary bytes, peak RSS
<= (a) + 300 MB. moto keeps objects in memory in the driver process, not measured.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

from harness import open_chdb, report_peak, run_measured

BUCKET = "ooni-bench"


def setup(workdir: Path, rows: int) -> None:
    from ooni_pipeline.clickhouse.schema import ensure_tables

    with open_chdb(workdir) as ch:
        ensure_tables(ch, "fastpath")
        ch.command(
            """
            INSERT INTO fastpath (measurement_uid, report_id, input, probe_cc, probe_asn, test_name,
                test_start_time, measurement_start_time, filename, scores, platform, anomaly, confirmed,
                msm_failure, domain, software_name, software_version, blocking_general, page_len,
                test_version, architecture, engine_name, engine_version, test_runtime, blocking_type)
            SELECT
                concat('2024', leftPad(toString(number), 10, '0'), 'n1_', hex(cityHash64(number))),
                concat('20240101T000000Z_webconnectivity_IT_3269_n1_', hex(cityHash64(number % 100000))),
                concat('https://www.site', toString(number % 30000), '.example.org/'),
                ['IT','DE','IR','RU','CN','US','BR','IN'][1 + number % 8],
                toInt32(1000 + number % 3000), 'web_connectivity',
                toDateTime('2024-01-01 00:00:00', 'UTC') + toIntervalSecond(intDiv(number * 31536000, {rows:UInt64})),
                toDateTime('2024-01-01 00:00:00', 'UTC') + toIntervalSecond(intDiv(number * 31536000, {rows:UInt64})),
                concat('raw/20240101/00/IT/webconnectivity/', toString(number % 5000), '.jsonl.gz'),
                concat('{"blocking_general":', toString(number % 3), ',"accuracy":1.0,"analysis":{"blocking_type":"',
                       ['dns','tcp_ip','http-diff'][1 + number % 3], '"}}'),
                'android', if(number % 5 = 0, 't', 'f'), 'f', 'f',
                concat('www.site', toString(number % 30000), '.example.org'),
                'ooniprobe-android', '3.8.0', toFloat32(number % 3), toInt32(number % 50000),
                '0.4.3', 'arm64', 'ooniprobe-engine', '3.20.0', toFloat32((number % 1000) / 100),
                ['', 'dns', 'tcp_ip', 'http-diff', 'http-failure'][1 + number % 5]
            FROM numbers({rows:UInt64})
            """,
            {"rows": rows},
        )
        print(f"fastpath rows: {ch.count('fastpath')}")


def _months(ch) -> list:
    from ooni_pipeline.backup.plan import FASTPATH_SPEC, list_chunks

    return list_chunks(ch, FASTPATH_SPEC)


def run_ours(workdir: Path, endpoint: str) -> None:
    from ooni_pipeline.backup.assets import BackupConfig, back_up_chunk
    from ooni_pipeline.backup.plan import table_source
    from ooni_pipeline.object_store import ObjectStoreResource

    store = ObjectStoreResource(
        bucket=BUCKET, endpoint_url=endpoint, region_name="us-east-1"
    ).get_store()
    config = BackupConfig(pause_between_chunks_s=0, chunk_attempts=1)

    class Log:
        def info(self, message: str) -> None:
            pass

        warning = info

    total = 0
    with open_chdb(workdir) as ch:
        source = table_source(ch, "fastpath").at_now(ch)
        for chunk in _months(ch):
            upload, rows, _ = back_up_chunk(ch, store, chunk, source, config, Log())
            total += upload.bytes
    print(f"objects_bytes={total}")


def run_clickhouse(workdir: Path, endpoint: str) -> None:
    from ooni_pipeline.backup.plan import select_sql, table_source

    with open_chdb(workdir) as ch:
        source = table_source(ch, "fastpath").at_now(ch)
        for chunk in _months(ch):
            sql, params = select_sql(chunk, source, max_threads=2)
            url = f"{endpoint}/{BUCKET}/{chunk.key}"
            ch.command(
                f"INSERT INTO FUNCTION s3('{url}', 'testing', 'testing', 'CSVWithNames', 'auto', 'zstd') "
                f"{sql.split(' SETTINGS ')[0]} SETTINGS max_threads = 2, s3_truncate_on_insert = 1",
                params,
            )
    print("done")


def run_old(workdir: Path, endpoint: str) -> None:
    import boto3
    import zstandard

    from ooni_pipeline.backup.plan import select_sql, table_source

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    with open_chdb(workdir) as ch:
        source = table_source(ch, "fastpath").at_now(ch)
        header = ",".join(f'"{c}"' for c in ch.header("SELECT * FROM fastpath")) + "\n"
        for chunk in _months(ch):
            sql, params = select_sql(chunk, source, max_threads=2)
            with tempfile.NamedTemporaryFile(suffix=".csv.zstd") as tmp:
                with zstandard.ZstdCompressor(level=3).stream_writer(tmp, closefd=False) as out:
                    out.write(header.encode())
                    for data in ch.stream(sql, params, fmt="CSV", prefetch=0):
                        out.write(data)
                tmp.flush()
                client.upload_file(tmp.name, BUCKET, chunk.key)
    print("done")


MODES = {"ours": run_ours, "clickhouse": run_clickhouse, "old": run_old}


def measure(mode: str, workdir: Path, endpoint: str) -> tuple[float, float, int]:
    """(wall s, peak RSS MB, peak temporary bytes) of one mode in a fresh process."""
    tmpdir = Path(tempfile.mkdtemp(prefix=f"bench-{mode}-"))
    env = {
        **os.environ,
        "TMPDIR": str(tmpdir),
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
    }
    peak_tmp = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            size = sum(p.stat().st_size for p in tmpdir.rglob("*") if p.is_file())
            peak_tmp[0] = max(peak_tmp[0], size)
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        wall, rss, _ = run_measured(
            [__file__, "--run", mode, "--workdir", str(workdir), "--endpoint", endpoint], env
        )
    finally:
        done.set()
        sampler.join()
        shutil.rmtree(tmpdir, ignore_errors=True)
    return wall, rss, peak_tmp[0]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=6_000_000)
    parser.add_argument("--workdir", type=Path, default=Path("bench/out/backup"))
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--run", choices=sorted(MODES))
    parser.add_argument("--endpoint")
    args = parser.parse_args()
    if args.run:
        MODES[args.run](args.workdir, args.endpoint)
        report_peak()
        return
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"})
    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    setup(args.workdir, args.rows)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{server._server.server_port}"
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    client.create_bucket(Bucket=BUCKET)
    results: dict[str, list] = {m: [] for m in MODES}
    sizes = {}
    for _ in range(args.repeat):
        for mode in ("clickhouse", "ours", "old"):
            results[mode].append(measure(mode, args.workdir, endpoint))
            listing = client.list_objects_v2(
                Bucket=BUCKET, Prefix="clickhouse_export/csv/fastpath_"
            )
            sizes[mode] = (listing["KeyCount"], sum(o["Size"] for o in listing.get("Contents", [])))
    server.stop()
    best = {m: min(r, key=lambda x: x[0]) for m, r in results.items()}
    for mode, (wall, rss, tmp) in best.items():
        print(
            f"{mode:10s} wall {wall:7.2f} s  peak RSS {rss:6.0f} MB  peak temp {tmp / 1e6:8.1f} MB  "
            f"objects {sizes[mode][0]} ({sizes[mode][1] / 1e6:.1f} MB)"
        )
    (ow, orss, otmp), (aw, arss, _), (bw, _, _) = best["ours"], best["clickhouse"], best["old"]
    print(
        f"ours/clickhouse wall {ow / aw:.2f}x (target <= 1.5); old/ours {bw / ow:.2f}x (target > 1); "
        f"temp {otmp} bytes (target 0); RSS ours - clickhouse {orss - arss:+.0f} MB (target <= +300)"
    )


if __name__ == "__main__":
    main()
