"""Benchmark: the four table updaters from a shell, as users run them, on operator tables.

Run by hand (a few minutes); the checkout under test is the one ``ooni_pipeline``
is imported from, so a worktree is benchmarked with its own code:

    PYTHONPATH=<checkout> .venv/bin/python bench/bench_updaters.py --label before \
        [--repeat 3] [--no-operator-tables] [--workdir <checkout>/bench/out/updaters]

Generated upstream content, of realistic size: test lists (~30,000 URLs over 100
country files plus global.csv) in a local git repository (file:// URL);
fingerprints (~300 DNS, ~1,300 HTTP) and an AS map (100,000 ASNs) served over
HTTP on 127.0.0.1. With ``--operator-tables`` (the default) the live tables are
created first, as an operator would: OONI's DDL plus a column of their own
(``added_by``) and a setting. Then each updater (``citizenlab``,
``fingerprints_dns``, ``fingerprints_http``, ``asnmeta``) runs ``--repeat`` times:
``dagster asset materialize`` with the default config plus ``force: true`` (every
run rewrites the table), checks included, a fresh DAGSTER_HOME with the project's
dagster.yaml (harness.timed_cli). Reported per updater: best / median wall, peak
RSS, rows, checks passed, and whether ``SHOW CREATE TABLE`` after the runs equals
the one before the first run (without operator tables: the one after the first run).
The table is printed and appended to results/updaters.txt next to this script.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import ooni_pipeline

CODE = Path(ooni_pipeline.__file__).resolve().parents[1]  # the checkout under test
# Its own harness: timed_cli runs the CLI with PYTHONPATH and cwd = harness.ROOT.
sys.path.insert(0, str(CODE / "bench"))
import harness  # noqa: E402
from harness import dagster_home, materialize_argv, open_chdb, timed_cli  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "updaters.txt"
UPDATERS = ("citizenlab", "fingerprints_dns", "fingerprints_http", "asnmeta")
COUNTRIES = (
    "ad ae af al am ao ar at au az ba bd be bf bg bh bi bj bo br by bz ca cd cf ch ci cl cm "
    "cn co cr cu cy cz de dk do dz ec ee eg er es et fi fr ga gb ge gh gr gt hk hn hr ht hu "
    "id ie il in iq ir is it jo jp ke kg kh kr kw kz la lb lk lt lu lv ly ma md me mg mk ml "
    "mm mn mx my mz ng ni nl no np nz om pa pe ph pk pl ps pt py qa ro rs ru rw sa sd se sg "
    "sy th tj tr tz ua ug us uz ve vn ye zw"
).split()[:100]
CATEGORIES = (
    "NEWS POLR HUMR LGBT REL ANON COMT GRP SRCH HOST MMED CULTR GAME FILE HACK ECON".split()
)


def _fingerprint_ddl(table: str) -> str:
    from ooni_pipeline.clickhouse.schema import _FINGERPRINT_COLUMNS, DNS_SCOPES, HTTP_SCOPES, _enum

    scopes = _enum(DNS_SCOPES if table == "fingerprints_dns" else HTTP_SCOPES)
    return (
        f"CREATE TABLE {table} ({_FINGERPRINT_COLUMNS.format(scopes=scopes)}, "
        "added_by String DEFAULT 'operator') ENGINE = EmbeddedRocksDB PRIMARY KEY name "
        "SETTINGS optimize_for_bulk_insert = 0"
    )


OPERATOR_DDL = {
    "citizenlab": "CREATE TABLE citizenlab (domain String, url String, cc FixedString(32), "
    "category_code String, added_by String DEFAULT 'operator') ENGINE = ReplacingMergeTree "
    "ORDER BY (domain, url, cc, category_code) SETTINGS index_granularity = 4",
    "asnmeta": "CREATE TABLE asnmeta (asn UInt32, org_name String, cc String, changed Date, "
    "aut_name String, source String, added_by String DEFAULT 'operator') ENGINE = MergeTree "
    "ORDER BY (asn, changed) SETTINGS index_granularity = 8192",
    "fingerprints_dns": _fingerprint_ddl("fingerprints_dns"),
    "fingerprints_http": _fingerprint_ddl("fingerprints_http"),
}


def test_lists(urls: int) -> dict[str, str]:
    header = "url,category_code,category_description,date_added,source,notes"
    files: dict[str, list[str]] = {f"lists/{cc}.csv": [header] for cc in COUNTRIES}
    files["lists/global.csv"] = [header]
    names = sorted(files)
    for i in range(urls):
        host = f"www.site{i}.example" if i % 7 else f"news{i}.example.org"
        url = f"https://{host}/" if i % 3 else f"http://{host}/path/{i}?q={i % 11}"
        cat = CATEGORIES[i % len(CATEGORIES)]
        row = f'{url},{cat},"Category {cat}, described",2020-01-{1 + i % 28:02d},citizenlab,""'
        files[names[i % len(names)]].append(row)
    files["lists/00-LEGEND-category_codes.csv"] = ["CODE,NAME", "NEWS,News"]
    return {name: "\n".join(lines) + "\n" for name, lines in files.items()}


def fingerprints(kind: str, rows: int) -> str:
    from ooni_pipeline.clickhouse.schema import DNS_SCOPES, HTTP_SCOPES
    from ooni_pipeline.fingerprints.parse import HEADER

    scopes = DNS_SCOPES if kind == "dns" else HTTP_SCOPES
    lines = [",".join(HEADER)]
    for i in range(rows):
        ptype = ("full", "prefix", "contains", "full", "contains", "regexp")[i % 6] if kind == "dns" else ("contains", "contains", "prefix", "full", "regexp")[i % 5]  # fmt: skip
        if kind == "dns":
            where = "dns"
            pattern = rf"^10\.{i // 256}\.{i % 256}\.\d+$" if ptype == "regexp" else f"10.{i // 256}.{i % 256}.1"  # fmt: skip
        else:
            where = ("body", "header.location", "header.server")[i % 3]
            pattern = rf"<title>Blocked \d+ {i}</title>" if ptype == "regexp" else f"blockpage-{i}.example"  # fmt: skip
        lines.append(
            f"{kind}_{COUNTRIES[i % 100]}_{i:04d},{scopes[i % len(scopes)]},,{where},{ptype},"
            f'{pattern},{i % 2},"{COUNTRIES[i % 100].upper()},RU",ooni,https://x.example/{i},"note, {i}"'
        )
    return "\n".join(lines) + "\n"


def show_create(workdir: Path, tables: tuple[str, ...]) -> dict[str, str | None]:
    with open_chdb(workdir) as ch:
        present = {r[0] for r in ch.query_rows("SELECT name FROM system.tables WHERE database = currentDatabase()")}  # fmt: skip
        return {t: ch.scalar(f"SHOW CREATE TABLE {t}") if t in present else None for t in tables}


def run_facts(home: Path, key: str) -> tuple[bool, int | None, list[bool]]:
    """(skipped, rows, checks passed) of the newest run in ``home``."""
    import dagster as dg

    with dg.DagsterInstance.from_config(str(home)) as instance:
        run = instance.get_runs(limit=1)[0]
        skipped, rows, checks = True, None, []
        for event in instance.all_logs(run.run_id):
            dagster_event = event.dagster_event
            if dagster_event is None:
                continue
            if dagster_event.event_type_value == "ASSET_MATERIALIZATION":
                metadata = dagster_event.event_specific_data.materialization.metadata
                skipped = metadata["skipped"].value
                rows = metadata["dagster/row_count"].value
            elif dagster_event.event_type_value == "ASSET_CHECK_EVALUATION":
                checks.append(dagster_event.event_specific_data.passed)
    return skipped, rows, checks


def bench(key: str, repeat: int, home: Path, workdir: Path) -> dict:
    config = json.dumps({"ops": {key: {"config": {"force": True}}}})
    walls, rss, rows, checks, errors, kept_each = [], [], None, [], [], []
    before = show_create(workdir, (key,))[key]
    for _ in range(repeat):
        try:
            wall, peak, proc = timed_cli([*materialize_argv(key), "--config-json", config], home, workdir)  # fmt: skip
        except SystemExit as exc:
            errors.append(str(exc))
            break
        if "RUN_SUCCESS" not in proc.stderr:
            errors.append(f"no RUN_SUCCESS:\n{proc.stderr[-3000:]}")
            break
        skipped, rows, passed = run_facts(home, key)
        if skipped:
            errors.append("a run skipped the rewrite despite force: true")
        walls.append(wall)
        rss.append(peak)
        checks.extend(passed)
        after = show_create(workdir, (key,))[key]
        before = before or after  # no operator table: the first run's definition is the reference
        kept_each.append(after == before)
    return {
        "walls": walls, "rss": max(rss, default=0.0), "rows": rows, "errors": errors,
        "checks": f"{sum(checks)}/{len(checks)}", "kept_each": kept_each,
        "kept": bool(kept_each) and kept_each[-1],
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--label", required=True)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--urls", type=int, default=30_000)
    parser.add_argument("--asns", type=int, default=100_000)
    parser.add_argument("--operator-tables", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--workdir", type=Path, default=CODE / "bench" / "out" / "updaters")
    args = parser.parse_args()
    assert harness.ROOT == CODE, (harness.ROOT, CODE)
    from bench_asnmeta import generate

    from ooni_pipeline_tests.rig import GitRepo, UpstreamServer

    workdir = args.workdir.absolute()
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    repo = GitRepo(workdir / "test-lists")
    repo.commit(test_lists(args.urls), "test lists")
    server = UpstreamServer()
    os.environ.update(
        OONI_TEST_LISTS_REPO=repo.url,
        OONI_FINGERPRINTS_DNS_URL=server.put("fingerprints_dns.csv", fingerprints("dns", 300)),
        OONI_FINGERPRINTS_HTTP_URL=server.put("fingerprints_http.csv", fingerprints("http", 1300)),
        OONI_ASNMETA_URL=server.put("all_as_org_map.json", generate(args.asns, args.asns * 13 // 10)),
    )  # fmt: skip
    if args.operator_tables:
        with open_chdb(workdir) as ch:
            for ddl in OPERATOR_DDL.values():
                ch.command(ddl)
    commit = subprocess.run(
        ["git", "-C", str(CODE), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    home = dagster_home()
    results = {key: bench(key, args.repeat, home, workdir) for key in UPDATERS}
    server.close()
    shutil.rmtree(home, ignore_errors=True)
    lines = [
        f"== {datetime.now(UTC):%Y-%m-%d %H:%M} UTC  label={args.label}  commit={commit}  "
        f"code={CODE}  operator tables={'yes' if args.operator_tables else 'no'}  "
        f"runs={args.repeat} (force: true)  load {os.getloadavg()[0]:.1f}",
        f"{'updater':18s} {'best s':>7s} {'median s':>8s} {'peak RSS MB':>11s} {'rows':>7s} "
        f"{'checks':>6s}  definition kept (after each run)",
    ]
    for key, r in results.items():
        walls = r["walls"]
        best = f"{min(walls):7.2f}" if walls else f"{'-':>7s}"
        median = f"{statistics.median(walls):8.2f}" if walls else f"{'-':>8s}"
        each = ",".join("yes" if k else "no" for k in r["kept_each"])
        lines.append(
            f"{key:18s} {best} {median} {r['rss']:11.0f} {r['rows'] or '-':>7} "
            f"{r['checks']:>6s}  {'yes' if r['kept'] else 'no':3s} ({each})"
            + (f"  FAILED after {len(walls)} run(s)" if r["errors"] else "")
        )
    for key, r in results.items():
        for error in r["errors"]:
            lines.append(f"{key} error: " + "\n    ".join(error.strip().splitlines()[:12]))
    text = "\n".join(lines) + "\n"
    print(text, end="")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as out:
        out.write(text + "\n")


if __name__ == "__main__":
    main()
