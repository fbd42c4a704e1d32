"""Benchmark: fastpath rows from one upload day of OONI's open bucket (postcans on S3).

Run by hand from the repository root (~10 minutes, plus generating the data once):

    .venv/bin/python bench/bench_public_fastpath.py [--measurements 60000] [--rounds 2]
        [--modes floor_a,floor_b,floor_c,ours,reference] [--reference main]

The day: the real msm_*.json of ooni_pipeline_tests/data/ooni cycled, re-dated to 2024-01-01,
new uids, packed as OONI's uploader does (~10 MB tar.gz postcans of {"format":"json",...}
members at raw/20240101/HH/CC/webconnectivity/, 12 countries x 2 hours), cached in the
workdir and served anonymously by a moto server on 127.0.0.1. Each way in its own process,
the modes alternated round by round, the best of the rounds kept, with the load average
before each run (other work shares the machine):
  floor_a    boto3 streaming each postcan + Python's tarfile reading every member (what the
             asset must do in Python at least)
  floor_b    floor_a + json.loads of every member (parsing in Python, which the asset avoids)
  floor_c    chdb parsing, from a local RowBinary file of the members, every field the
             scoring reads (the asset's own typed reading, scoring_sql.MEMBER_TYPE), into a
             small aggregate: the engine's share at least
  ours       `dagster asset materialize --select public_fastpath`, default config, the whole
             CLI run
  reference  the same CLI run of the code at git revision --reference (default main), to
             check that the rows are the same and to put the figure beside ours
  baseline   (not by default) OONI's fastpath as a plain loop: boto3, tarfile, json.loads,
             Python scoring (core.py's web_connectivity rules re-implemented), one pandas
             insert into its own chdb
Floors time their own work (imports and opening chdb excluded); ours and reference the whole
process. Ratio printed: ours / (floor_a + floor_c). Rows: ours and reference compared per
measurement_uid, every column of fastpath (baseline: the columns OONI's fastpath writes).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime, timedelta
from pathlib import Path

from harness import MARKER, open_chdb, report_peak, run_measured

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "ooni_pipeline_tests" / "data" / "ooni"
DAGSTER = Path(sys.executable).with_name("dagster")
BUCKET = "ooni-data-eu-fra"
REGION = "eu-central-1"
DAY = "2024-01-01"
COUNTRIES = ("BR", "CN", "DE", "ID", "IN", "IR", "IT", "MM", "RU", "TR", "UA", "US")
HOURS = ("09", "21")
POSTCAN_BYTES = 10_000_000  # near the uploader's roll-over size
TIME = "%Y-%m-%d %H:%M:%S"
# the fastpath columns OONI's fastpath writes (db.py), compared per measurement_uid; and
# scores with JSON numbers normalised (1.0 -> 1)
COMPARED = {c: c for c in (
    "report_id", "input", "probe_cc", "probe_asn", "test_name", "test_start_time",
    "measurement_start_time", "scores", "platform", "anomaly", "confirmed", "msm_failure",
    "blocking_type", "domain", "software_name", "software_version", "test_version",
    "test_runtime", "architecture", "engine_name", "engine_version",
    "test_helper_address", "test_helper_type",
)} | {"scores_as_json": r"replaceRegexpAll(scores, '(\\d)\\.0([,}\\]])', '\\1\\2')"}  # fmt: skip


def _write_hour(job: tuple) -> list[tuple[str, int, int]]:
    """Write one hour directory's postcans; (key, members, member bytes) of each."""
    import random

    outdir, day, cc, hour, first, count, late_every = job
    samples = [json.loads((DATA / f"msm_{i}.json").read_text()) for i in range(1, 11)]
    rng = random.Random(f"{cc}-{hour}" if day == DAY else f"{day}-{cc}-{hour}")
    stem = f"{day.replace('-', '')}{hour}_{cc}_webconnectivity"
    midnight = datetime.strptime(day, "%Y-%m-%d")
    cans: list[list] = []
    fh = tar = None
    for n in range(first, first + count):
        if tar is None:  # a new postcan, as the uploader's fill_postcan
            cans.append(
                [f"raw/{stem[:8]}/{hour}/{cc}/webconnectivity/{stem}.n1.{len(cans)}.tar.gz", 0, 0]
            )
            (outdir / cans[-1][0]).parent.mkdir(parents=True, exist_ok=True)
            tar = tarfile.open(fileobj=(fh := (outdir / cans[-1][0]).open("wb")), mode="w:gz")
        msm = dict(samples[n % len(samples)])
        lead = datetime.strptime(msm["measurement_start_time"], TIME) - datetime.strptime(
            msm["test_start_time"], TIME
        )
        start = midnight + timedelta(hours=int(hour), seconds=rng.randrange(600, 3300))
        # a probe that uploads a day late: received on this upload day, measured the day before
        start_received = start
        if late_every and n % late_every == 0:
            start -= timedelta(days=1)
        msm.update(
            measurement_start_time=f"{start:{TIME}}",
            test_start_time=f"{start - lead:{TIME}}",
            probe_cc=cc,
        )
        if msm.get("report_id"):  # 50 measurements per report
            msm["report_id"] = f"{msm['report_id'][:-6]}{n // 50:06d}"
        if n % 3:
            msm["input"] += f"{'&' if '?' in msm['input'] else '?'}bench={n % 1000}"
        body = json.dumps({"format": "json", "content": msm}, ensure_ascii=False).encode()
        received = start_received + timedelta(
            seconds=rng.randrange(60, 300), microseconds=rng.randrange(10**6)
        )
        uid = f"{received:%Y%m%d%H%M%S.%f}_{cc}_webconnectivity_{hashlib.sha512(body).hexdigest()[:16]}"
        (info := tarfile.TarInfo(f"{stem}/{uid}.post")).size = len(body)
        tar.addfile(info, io.BytesIO(body))
        cans[-1][1:] = cans[-1][1] + 1, cans[-1][2] + len(body)
        if fh.tell() > POSTCAN_BYTES or n == first + count - 1:
            tar.close(), fh.close()
            tar = None
    return [tuple(can) for can in cans]


def generate(outdir: Path, measurements: int, day: str = DAY, late_every: int = 0) -> dict:
    """The upload day's postcans under ``outdir`` (reused when the parameters match); with
    ``late_every`` N, every Nth measurement was made the day before."""
    manifest = outdir / "manifest.json"
    params = {"measurements": measurements, "countries": list(COUNTRIES), "hours": list(HOURS)}
    if (day, late_every) != (DAY, 0):
        params |= {"day": day, "late_every": late_every}
    if manifest.is_file() and (cached := json.loads(manifest.read_text()))["params"] == params:
        print(f"reusing postcans in {outdir}", flush=True)
        return cached
    shutil.rmtree(outdir, ignore_errors=True)
    dirs = [(cc, hour) for hour in HOURS for cc in COUNTRIES]
    bounds = [i * measurements // len(dirs) for i in range(len(dirs) + 1)]
    jobs = [
        (outdir, day, cc, hour, bounds[i], bounds[i + 1] - bounds[i], late_every)
        for i, (cc, hour) in enumerate(dirs)
    ]
    print(f"writing {measurements} measurements into postcans under {outdir} ...", flush=True)
    with ProcessPoolExecutor() as pool:
        cans = [can for result in pool.map(_write_hour, jobs) for can in result]
    day = {
        "params": params,
        "cans": [[key, n, raw, (outdir / key).stat().st_size] for key, n, raw in cans],
    }
    manifest.write_text(json.dumps(day))
    return day


# The baseline: ooni/backend fastpath core.py (commit 040e6ccd) and db.py, as a plain loop.
def load_fingerprints() -> dict[str, list[dict]]:
    """prepare_fingerprints(): the eight columns, expected_countries a sorted list."""
    from ooni_pipeline.clickhouse.schema import DNS_SCOPES, HTTP_SCOPES
    from ooni_pipeline.fingerprints.parse import HEADER, parse_fingerprints

    keys = HEADER[: HEADER.index("confidence_no_fp") + 1]
    out = {}
    for kind, scopes in (("dns", DNS_SCOPES), ("http", HTTP_SCOPES)):
        path = DATA / f"fingerprints_{kind}.csv"
        rows = sorted(
            parse_fingerprints(path.read_bytes(), path.name, scopes).table.to_pylist(),
            key=lambda r: r["name"],
        )
        countries = [
            sorted({c.upper() for c in r["expected_countries"].strip().split(",")} - {"", "ZZ"})
            for r in rows
        ]
        out[kind] = [
            {**{k: r[k] for k in keys}, "expected_countries": ec}
            for r, ec in zip(rows, countries, strict=True)
        ]
    return out


def _get(d, key, default):  # utils.dget_or: the default when missing or None
    value = d.get(key)
    return default if value is None else value


def match_fingerprints(tk: dict, fps: dict) -> list[dict]:
    from base64 import b64decode

    matches = []
    for query in _get(tk, "queries", ()):
        for answer in _get(query, "answers", ()):
            addr = answer.get("ipv4", answer.get("hostname", answer.get("ipv6", "")))
            matches += [fp for fp in fps["dns"] if addr == fp["pattern"]]
    for request in _get(tk, "requests", ()):
        resp = request.get("response")
        if resp is None:
            continue
        body = resp.get("body")
        if isinstance(body, dict):
            body = (
                b64decode(body["data"])
                if "data" in body and body.get("format", "") == "base64"
                else None
            )
        if body is not None:  # every body pattern is a literal substring, whatever its type
            raw = isinstance(body, bytes)
            matches += [
                fp for fp in fps["http"]
                if fp["location_found"] == "body" and body.find(fp["pattern"].encode() if raw else fp["pattern"]) != -1
            ]  # fmt: skip
        headers = _get(resp, "headers", {})
        headers = {h.lower(): v for h, v in headers.items()} if headers else {}
        for fp in (
            fp for fp in fps["http"] if headers and fp["location_found"].startswith("header.")
        ):
            value = headers.get(fp["location_found"][7:])
            if fp["pattern_type"] == "full" and value == fp["pattern"]:
                matches.append(fp)
            elif fp["pattern_type"] == "prefix":
                if isinstance(value, dict) and value.get("format") == "base64":
                    value = b64decode(value.get("data", "")).decode("latin1")
                if isinstance(value, str) and value.startswith(fp["pattern"]):
                    matches.append(fp)
    return matches


def score_web_connectivity(msm: dict, matches: list[dict]) -> dict:
    scores: dict = {
        f"blocking_{lv}": 0.0 for lv in ("general", "global", "country", "isp", "local")
    }
    tk = _get(msm, "test_keys", {})
    if matches:
        mini = ("name", "scope", "location_found", "confidence_no_fp", "expected_countries")
        scores["fingerprints"] = [{k: fp[k] for k in mini} for fp in matches]
    probe_cc = _get(msm, "probe_cc", "ZZ").upper()
    for fp in matches:  # is_confirmed()
        if (probe_cc != "ZZ" and probe_cc in fp["expected_countries"]) or fp["scope"] in (
            "isp",
            "nat",
        ):
            locality = {"inst": "local", "isp": "isp", "nat": "country"}.get(fp["scope"], "general")
            scores[f"blocking_{locality}"] = 1.0
            scores["confirmed"] = True
    if tk.get("title_match") not in (True, False, None):
        scores["accuracy"] = 0.0
        return scores
    blocking = tk.get("blocking")
    if blocking in ("tcp_ip", "dns", "http-diff", "http-failure"):
        scores["blocking_general"] = 1.0
        scores["analysis"] = {"blocking_type": blocking}
    elif blocking is None:
        if not matches:
            scores["accuracy"] = 0.0
    elif blocking != 0:  # anything but False (0 == False)
        scores["analysis"] = {"msg": "Unsupported blocking type"}
        scores["accuracy"] = 0.0
    if any(k.endswith("_failure") and (tk[k] or "").startswith("unknown_failure") for k in tk):
        scores["accuracy"] = 0.0
    scores["blocking_general"] += sum(
        scores[f"blocking_{lv}"] for lv in ("country", "global", "isp", "local")
    )
    if "accessible" in tk and tk["accessible"] is None and not matches:
        scores["accuracy"] = 0.0
    return scores


def score_full(msm: dict, fps: dict) -> dict:
    import binascii

    try:
        tk = msm.get("test_keys")
        return score_web_connectivity(msm, [] if tk is None else match_fingerprints(tk, fps))
    except binascii.Error:  # an undecodable base64 body or header: no matches, accuracy 0
        scores = score_web_connectivity(msm, [])
        scores["accuracy"] = 0.0
        return scores


def fastpath_row(msm: dict, uid: str, fps: dict) -> dict | None:
    """process_measurement + db.clickhouse_upsert_summary; None when OONI drops it."""
    from urllib.parse import urlparse

    if (
        msm.get("report_id") is None
        or msm.get("probe_cc", "").upper() == "ZZ"
        or msm.get("probe_asn", "").upper() == "AS0"
    ):
        return None
    if msm["test_name"] == "web_connectivity":
        scores = score_full(msm, fps)
    else:
        scores = {
            f"blocking_{lv}": 0.0 for lv in ("general", "global", "country", "isp", "local")
        } | {"accuracy": 0.0}
    start = datetime.strptime(msm["measurement_start_time"], TIME)
    if uid.startswith("20") and len(uid) >= 20:  # flag_measurements_with_wrong_date
        delta = (datetime.strptime(uid[:22], "%Y%m%d%H%M%S.%f_") - start).total_seconds()
        if delta < -3600 or delta > 31536000:
            scores["accuracy"] = 0.0
            scores["msg"] = (
                f"Measurement start time {'from the future' if delta < 0 else 'too old'}"
            )
    annot = msm.get("annotations") if isinstance(msm.get("annotations"), dict) else {}
    try:
        backend = _get(_get(msm, "test_helpers", {}), "backend", {})
        helper = (_get(backend, "address", ""), _get(backend, "type", ""))
    except AttributeError:
        helper = ("", "")
    inp = msm.get("input") or ""
    tf = {True: "t", False: "f"}
    return {
        "measurement_uid": uid, "report_id": msm.get("report_id") or "", "input": inp, "probe_cc": msm.get("probe_cc") or "",
        "probe_asn": int(msm["probe_asn"][2:]), "test_name": msm.get("test_name") or "",
        "test_start_time": datetime.strptime(msm["test_start_time"], TIME), "measurement_start_time": start,
        "scores": json.dumps(scores, separators=(",", ":")).replace("/", "\\/"),  # as ujson.dumps
        "platform": _get(annot, "platform", "unset"), "anomaly": tf[scores.get("blocking_general", 0.0) > 0.5],
        "confirmed": tf[scores.get("confirmed", False)], "msm_failure": tf[scores.get("accuracy", 1.0) < 0.5],
        "blocking_type": _get(_get(scores, "analysis", {}), "blocking_type", ""), "domain": urlparse(inp).netloc,
        "software_name": msm.get("software_name") or "", "software_version": msm.get("software_version") or "",
        "test_version": _get(msm, "test_version", ""), "test_runtime": _get(msm, "test_runtime", 0.0),
        "architecture": _get(annot, "architecture", ""), "engine_name": _get(annot, "engine_name", ""),
        "engine_version": _get(annot, "engine_version", ""), "test_helper_address": helper[0], "test_helper_type": helper[1],
    }  # fmt: skip


def run_baseline(workdir: Path, endpoint: str) -> None:
    import tempfile

    import boto3
    import pandas as pd
    from botocore import UNSIGNED
    from botocore.config import Config

    from ooni_pipeline.clickhouse.schema import ensure_tables

    fps = load_fingerprints()
    s3 = boto3.client(
        "s3", endpoint_url=endpoint, region_name=REGION, config=Config(signature_version=UNSIGNED)
    )
    keys = sorted(
        item["Key"]
        for page in s3.get_paginator("list_objects_v2").paginate(
            Bucket=BUCKET, Prefix=f"raw/{DAY.replace('-', '')}/"
        )
        for item in page.get("Contents", [])
        if item["Key"].endswith(".tar.gz")
    )
    rows, members = [], 0
    for key in keys:  # s3feeder.fetch_cans + load_multiple
        with tempfile.TemporaryFile() as can:
            s3.download_fileobj(BUCKET, key, can)
            can.seek(0)
            with tarfile.open(fileobj=can, mode="r:gz") as tar:
                for member in tar:
                    if not member.name.endswith(".post"):
                        continue
                    members += 1
                    post = json.loads(tar.extractfile(member).read())
                    if post.get("format", "") != "json":
                        continue
                    try:
                        rows.append(
                            fastpath_row(
                                post.get("content", {}), member.name.rsplit("/", 1)[1][:-5], fps
                            )
                        )
                    except Exception:  # process_measurement logs and drops it
                        rows.append(None)
    kept = [row for row in rows if row is not None]
    with open_chdb(workdir) as ch:
        ensure_tables(ch, "fastpath")
        ch.insert_df("fastpath", pd.DataFrame(kept))
    print(
        f"postcans={len(keys)} members={members} rows={len(kept)} dropped={len(rows) - len(kept)}"
    )


def run_setup(datadir: Path, endpoint: str) -> None:
    """Load the fingerprint tables into the chdb directory the asset will open."""
    from ooni_pipeline.clickhouse.schema import DNS_SCOPES, HTTP_SCOPES, ensure_tables
    from ooni_pipeline.fingerprints.parse import parse_fingerprints

    with open_chdb(datadir) as ch:
        ensure_tables(ch, "fingerprints_dns", "fingerprints_http")
        for kind, scopes in (("dns", DNS_SCOPES), ("http", HTTP_SCOPES)):
            path = DATA / f"fingerprints_{kind}.csv"
            ch.insert_arrow(
                f"fingerprints_{kind}",
                parse_fingerprints(path.read_bytes(), path.name, scopes).table,
            )
            print(f"fingerprints_{kind}={ch.count(f'fingerprints_{kind}')}")


def _bucket_keys(s3) -> list[str]:
    return sorted(
        item["Key"]
        for page in s3.get_paginator("list_objects_v2").paginate(
            Bucket=BUCKET, Prefix=f"raw/{DAY.replace('-', '')}/"
        )
        for item in page.get("Contents", [])
        if item["Key"].endswith(".tar.gz")
    )


def _read_members(endpoint: str, parse: bool) -> None:
    """floor_a / floor_b: every member of every postcan, streamed once."""
    import boto3
    from botocore import UNSIGNED
    from botocore.config import Config

    s3 = boto3.client(
        "s3", endpoint_url=endpoint, region_name=REGION, config=Config(signature_version=UNSIGNED)
    )
    started = time.monotonic()
    members = size = 0
    for key in _bucket_keys(s3):
        body = s3.get_object(Bucket=BUCKET, Key=key)["Body"]
        with tarfile.open(fileobj=body, mode="r|gz") as tar:
            for info in tar:
                if info.isfile() and info.name.endswith(".post"):
                    data = tar.extractfile(info).read()
                    if parse:
                        json.loads(data)
                    members += 1
                    size += len(data)
    print(f"{MARKER_S}{time.monotonic() - started:.3f} members={members} bytes={size}")


def run_floor_a(workdir: Path, endpoint: str) -> None:
    _read_members(endpoint, parse=False)


def run_floor_b(workdir: Path, endpoint: str) -> None:
    _read_members(endpoint, parse=True)


def write_members_file(postcans: Path, cans: list, path: Path) -> None:
    """The day's members as RowBinary (member_key, member_name, raw): floor_c's input."""
    from ooni_pipeline.fastpath.ingest import rowbinary_string

    if path.is_file():
        return
    with path.with_suffix(".tmp").open("wb") as out:
        for key, *_ in cans:
            with tarfile.open(postcans / key, mode="r|gz") as tar:
                for info in tar:
                    if info.isfile() and info.name.endswith(".post"):
                        data = tar.extractfile(info).read()
                        out.write(
                            rowbinary_string(key.encode())
                            + rowbinary_string(info.name.encode())
                            + rowbinary_string(data)
                        )
    path.with_suffix(".tmp").rename(path)


def run_floor_c(workdir: Path, endpoint: str) -> None:
    from ooni_pipeline.fastpath.ingest import MEMBER_STRUCTURE
    from ooni_pipeline.fastpath.scoring_sql import MEMBER_TYPE, SCORING_QUERY_SETTINGS

    path = workdir / "members.rowbinary"
    with open_chdb(workdir / "floor_c") as ch:
        started = time.monotonic()
        row = ch.query_rows(
            f"""SELECT count(), sum(length(ifNull(j.content.report_id, ''))),
                sum(length(j.content.test_keys.requests)), sum(length(j.content.test_keys.queries)),
                countIf(dynamicType(j.content.test_keys.blocking) = 'String')
            FROM (SELECT JSONExtract(raw, '{MEMBER_TYPE}') AS j
                  FROM file('{path}', RowBinary, '{MEMBER_STRUCTURE}'))
            SETTINGS max_block_size = 512, {SCORING_QUERY_SETTINGS}"""
        )[0]
        print(f"{MARKER_S}{time.monotonic() - started:.3f} members={row[0]}")


def ours_env(workdir: Path, endpoint: str, source: Path = ROOT) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OONI_", "AWS_"))}
    home, data = str(workdir / "home"), str(workdir / "data")
    return env | {
        "OONI_DATA_DIR": data,
        "OONI_PUBLIC_BUCKET": BUCKET,
        "OONI_PUBLIC_ENDPOINT_URL": endpoint,
        "DAGSTER_HOME": home,
        "PYTHONPATH": str(source),
    }


def run_cli(workdir: Path, endpoint: str, source: Path = ROOT) -> None:
    """The CLI in a child, from the code in ``source``; peak = the largest process of its
    tree (ru_maxrss of children)."""
    argv = [
        "asset",
        "materialize",
        "-m",
        "ooni_pipeline.definitions",
        "--select",
        "public_fastpath",
        "--partition",
        DAY,
    ]
    with (workdir / "dagster.log").open("w") as log:
        cli = subprocess.Popen(
            [str(DAGSTER), *argv],
            cwd=source,
            env=ours_env(workdir, endpoint, source),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        timeout, timed_out = float(os.environ["BENCH_OURS_TIMEOUT_S"]), False
        try:
            rc = cli.wait(timeout=timeout)
        except subprocess.TimeoutExpired:  # stop the CLI's own process group (its run and step)
            os.killpg(cli.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                cli.wait(timeout=30)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(cli.pid, signal.SIGKILL)
            rc, timed_out = cli.wait(), True
            print(f"TIMEOUT: killed unfinished after {timeout / 60:g} min")
    text = (workdir / "dagster.log").read_text(errors="replace")
    steps = re.findall(
        r"(members (?:loaded|read and scored) in [\d.]+ s|scored in [\d.]+ s"
        r"|\d+ members, \d+ scored, \d+ new or changed rows.*? in [\d.]+ s)",
        text,
    )
    print("; ".join(steps))
    if rc and not timed_out:
        print(text[-4000:], file=sys.stderr)
        raise SystemExit(rc)
    print(f"{MARKER}{resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}")


def run_ours(workdir: Path, endpoint: str) -> None:
    run_cli(workdir, endpoint)


def run_reference(workdir: Path, endpoint: str) -> None:
    run_cli(workdir, endpoint, workdir.parent / "reference-src")


def run_count(workdir: Path, endpoint: str) -> None:
    sums = ", ".join(f"toString(sum(cityHash64(measurement_uid, {c})))" for c in COMPARED.values())
    with open_chdb(workdir) as ch:
        row = ch.query_rows(
            "SELECT count(), uniqExact(measurement_uid), countIf(anomaly = 't'), countIf(confirmed = 't'), "
            f"countIf(msm_failure = 't'), {sums} FROM fastpath"
        )[0]
    names = ("rows", "uids", "anomaly", "confirmed", "msm_failure")
    print(
        "counts="
        + json.dumps(
            {
                **dict(zip(names, map(int, row[:5]), strict=True)),
                "sums": dict(zip(COMPARED, row[5:], strict=True)),
            }
        )
    )


def run_digest(workdir: Path, endpoint: str) -> None:
    """Each row of fastpath as (measurement_uid, hash of every stored column), to a file."""
    from ooni_pipeline.fastpath.ingest import ROW_COLUMNS

    columns = ", ".join(c for c in ROW_COLUMNS if c != "measurement_uid")
    with open_chdb(workdir) as ch:
        rows = ch.query_rows(
            f"SELECT measurement_uid, toString(cityHash64({columns})) FROM fastpath ORDER BY 1, 2"
        )
    (workdir / "digest.json").write_text(json.dumps(rows))
    print(f"digest rows={len(rows)}")


def _tree_rss_kb() -> int:
    """Sum of the resident memory of every descendant of this process."""
    procs = {}  # pid: (parent pid, RSS kB)
    for d in Path("/proc").glob("[0-9]*"):
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            procs[int(d.name)] = (
                ppid,
                int((d / "statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024,
            )
        except (OSError, ValueError, IndexError):
            continue
    tree, new = set(), {os.getpid()}
    while new:
        tree |= new
        new = {pid for pid, (ppid, _) in procs.items() if ppid in new} - tree
    return sum(procs[pid][1] for pid in tree - {os.getpid()} if pid in procs)


def measure(mode: str, workdir: Path, endpoint: str) -> tuple[float, float, float, str]:
    """(wall s, peak RSS MB of the largest process, peak tree RSS MB, output) of one mode."""
    peak, done = [0], threading.Event()

    def sample() -> None:
        while not done.wait(0.2):
            peak[0] = max(peak[0], _tree_rss_kb())

    threading.Thread(target=sample, daemon=True).start()
    try:
        wall, rss, out = run_measured(
            [__file__, "--run", mode, "--workdir", str(workdir), "--endpoint", endpoint]
        )
    finally:
        done.set()
    return wall, rss, peak[0] / 1024, out


def counts(datadir: Path, endpoint: str) -> dict:
    return json.loads(measure("count", datadir, endpoint)[3].split("counts=", 1)[1])


def measure_cli(mode: str, work: Path, endpoint: str) -> tuple:
    """Load the fingerprints into a fresh data directory, then run the CLI."""
    shutil.rmtree(work, ignore_errors=True)
    (work / "home").mkdir(parents=True)
    shutil.copy(ROOT / "dagster.yaml", work / "home" / "dagster.yaml")
    measure("setup", work / "data", endpoint)
    return measure(mode, work, endpoint)


def checkout(revision: str, target: Path) -> str:
    """The tree of ``revision`` (a commit of this repository) at ``target``."""
    commit = subprocess.run(
        ["git", "rev-parse", "--short", revision],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "archive", "--format=tar", commit], cwd=ROOT, check=True, capture_output=True
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(target, filter="data")
    return commit


MARKER_S = "timed_s="
MODES = {
    "baseline": run_baseline,
    "floor_a": run_floor_a,
    "floor_b": run_floor_b,
    "floor_c": run_floor_c,
    "ours": run_ours,
    "reference": run_reference,
    "setup": run_setup,
    "count": run_count,
    "digest": run_digest,
}
CLI_MODES = ("ours", "reference")


def serve_bucket(files: list[tuple[Path, str]]):
    """A moto server on 127.0.0.1 holding OONI's bucket with each ``(root, key)`` file at
    its key, readable anonymously; (the server, its endpoint)."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{server._server.server_port}"
    client = boto3.client("s3", endpoint_url=endpoint, region_name=REGION)
    client.create_bucket(
        Bucket=BUCKET, ACL="public-read", CreateBucketConfiguration={"LocationConstraint": REGION}
    )
    for root, key in files:
        client.put_object(Bucket=BUCKET, Key=key, Body=(root / key).read_bytes(), ACL="public-read")
    return server, endpoint


def _load() -> str:
    return "load {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--measurements", type=int, default=60_000)
    parser.add_argument("--workdir", type=Path, default=Path("bench/out/public_fastpath"))
    parser.add_argument("--modes", default="floor_a,floor_b,floor_c,ours,reference")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--reference", default="main", help="git revision run as `reference`")
    parser.add_argument("--ours-timeout-minutes", type=float, default=60)
    parser.add_argument("--run", choices=sorted(MODES))
    parser.add_argument("--endpoint")
    args = parser.parse_args()
    if args.run:
        MODES[args.run](args.workdir, args.endpoint)
        return None if args.run in CLI_MODES else report_peak()
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"})
    os.environ["BENCH_OURS_TIMEOUT_S"] = str(args.ours_timeout_minutes * 60)
    work = args.workdir.absolute()
    modes = args.modes.split(",")
    cans = generate(work / "postcans", args.measurements)["cans"]
    n, mb, raw_mb = (
        sum(c[1] for c in cans),
        sum(c[3] for c in cans) / 1e6,
        sum(c[2] for c in cans) / 1e6,
    )
    lines = [
        f"upload day {DAY}: {n} measurements in {len(cans)} postcans ({len(COUNTRIES)} countries x "
        f"{len(HOURS)} hours), {mb:.1f} MB compressed, {raw_mb:.1f} MB uncompressed; "
        f"{os.cpu_count()} cores; best of {args.rounds} rounds, modes alternated"
    ]
    print(lines[0], flush=True)
    if "floor_c" in modes:
        write_members_file(work / "postcans", cans, work / "members.rowbinary")
    if "reference" in modes:
        lines.append(
            f"reference: {args.reference} = {checkout(args.reference, work / 'reference-src')}"
        )
    server, endpoint = serve_bucket([(work / "postcans", key) for key, *_ in cans])
    runs: dict[str, list[tuple]] = {mode: [] for mode in modes}
    for round_ in range(1, args.rounds + 1):
        for mode in modes:
            load = _load()
            print(f"round {round_}: {mode} ({load}) ...", flush=True)
            if mode in CLI_MODES or mode == "baseline":
                wall, rss, tree, out = (
                    measure_cli(mode, work / mode, endpoint)
                    if mode in CLI_MODES
                    else measure(mode, work / mode, endpoint)
                )
                timed = wall
            else:
                wall, rss, tree, out = measure(mode, work, endpoint)
                timed = float(out.split(MARKER_S, 1)[1].split()[0])
            runs[mode].append((timed, rss, tree, load, out))
            print(f"  {timed:.2f} s, peak RSS {rss:.0f} MB; {out}", flush=True)
    server.stop()

    best = {mode: min(results) for mode, results in runs.items()}
    for mode, results in runs.items():
        figures = ", ".join(f"{r[0]:.2f} s ({r[3]})" for r in results)
        t, rss, tree = best[mode][:3]
        lines.append(
            f"{mode:9s} best {t:6.2f} s  {n / t:6.0f} msmt/s  peak RSS {rss:5.0f} MB (tree {tree:5.0f} MB)"
            f"   runs: {figures}"
        )
        if mode in CLI_MODES:
            lines.append(f"{'':9s} step: {best[mode][4]}")
    if {"floor_a", "floor_c", "ours"} <= set(best):
        floor = best["floor_a"][0] + best["floor_c"][0]
        lines.append(
            f"ours / (floor_a + floor_c) = {best['ours'][0]:.2f} / {floor:.2f} = {best['ours'][0] / floor:.2f}"
        )
    if {"ours", "reference"} <= set(best):
        lines.append(f"reference / ours = {best['reference'][0] / best['ours'][0]:.2f}")
        digests = {}
        for mode in ("ours", "reference"):
            measure("digest", work / mode / "data", endpoint)
            digests[mode] = dict(
                map(tuple, json.loads((work / mode / "data" / "digest.json").read_text()))
            )
        same = sum(digests["ours"].get(uid) == h for uid, h in digests["reference"].items())
        differ = sorted(
            set(digests["ours"]) ^ set(digests["reference"])
            | {uid for uid, h in digests["reference"].items() if digests["ours"].get(uid, h) != h}
        )
        lines.append(
            f"rows, ours vs reference: {len(digests['ours'])} vs {len(digests['reference'])}; identical in every "
            f"column per measurement_uid: {same}; differing or missing: {len(differ)} {differ[:3]}"
        )
    if {"baseline", "ours"} <= set(best):
        seen = {
            mode: counts(work / mode / ("data" if mode in CLI_MODES else ""), endpoint)
            for mode in ("baseline", "ours")
        }
        differ = [c for c in COMPARED if seen["baseline"]["sums"][c] != seen["ours"]["sums"][c]]
        lines.append(
            f"ours vs baseline (OONI's columns): {len(COMPARED) - len(differ)}/{len(COMPARED)} identical per "
            f"measurement_uid, differing: {', '.join(differ) or 'none'}"
        )
    print("\n".join(lines))
    result = ROOT / "bench" / "results" / "public_fastpath.txt"
    previous = result.read_text() if result.is_file() else ""
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    result.write_text(f"== {stamp}\n" + "\n".join(lines) + "\n\n" + previous)


if __name__ == "__main__":
    main()
