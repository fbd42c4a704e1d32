"""The ``geoip_db`` asset: this month's IP-to-country+ASN database, verified, installed atomically."""

import os
import tempfile
import time
from datetime import date, datetime, timezone
from pathlib import Path

import dagster as dg
from pydantic import Field

from ooni_pipeline import settings
from ooni_pipeline.common import OWNER
from ooni_pipeline.decompression import GiB
from ooni_pipeline.fetch import FetchError, fetch
from ooni_pipeline.geoip.mmdb import (
    DB_NAME,
    PROBE_IP,
    TS_NAME,
    GeoIPError,
    MmdbInfo,
    gunzip_to_file,
    installed_release,
    previous_month,
    release_ver,
    verify_mmdb,
    write_atomically,
)

GEOIP_KEY = dg.AssetKey("geoip_db")
# OONI's releases unpack to tens of MB; a bomb of the same download size to gigabytes.
DEFAULT_MAX_UNPACKED_BYTES = GiB


class GeoIPConfig(dg.Config):
    today: str | None = Field(
        default=None, description="YYYY-MM-DD to act as if it were that day (UTC); default today"
    )
    max_unpacked_bytes: int = Field(
        default=DEFAULT_MAX_UNPACKED_BYTES,
        gt=0,
        description="Cap on the unpacked mmdb (and on the download): past it the run fails and "
        "the installed file stays as it was",
    )


class NotPublished(Exception):
    pass


def _download(url: str, directory: Path, max_bytes: int, log) -> tuple[MmdbInfo, int, int]:
    """Download, gunzip (at most ``max_bytes``) and verify into a temporary file, then
    rename it into place."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{DB_NAME}.", suffix=".partial", dir=directory)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        try:
            with fetch(url, max_bytes=max_bytes) as fetched:
                compressed, size = gunzip_to_file(
                    fetched.iter_bytes(),
                    tmp,
                    max_bytes,
                    what=f"the GeoIP release {url}",
                    hint="raise max_unpacked_bytes in the run config of geoip_db "
                    "if a genuine release is that large",
                )
        except FetchError as exc:
            if exc.status == 404:
                raise NotPublished(str(exc)) from None
            raise
        info = verify_mmdb(tmp)
        log.info(
            f"verified {url}: {size} bytes, {info.node_count} nodes, {PROBE_IP} -> AS{info.probe_asn} {info.probe_country}"
        )
        os.replace(tmp, directory / DB_NAME)
        return info, compressed, size
    finally:
        tmp.unlink(missing_ok=True)


def _today(config: GeoIPConfig) -> date:
    return date.fromisoformat(config.today) if config.today else datetime.now(timezone.utc).date()


@dg.asset(key=GEOIP_KEY, group_name="geoip", kinds={"mmdb", "http"}, owners=[OWNER])
def geoip_db(context: dg.AssetExecutionContext, config: GeoIPConfig) -> dg.MaterializeResult:
    """The IP-to-country+ASN database (mmdb) that OONI's API geolocates probes with, at
    ``$OONI_GEOIP_DIR/asn_cc.mmdb``, with its release (``YYYYMM01``) in ``geoipdbts``.
    This month's release from ``OONI_GEOIP_URL_TEMPLATE`` is streamed, unpacked and
    verified (8.8.8.8 must resolve to an integer ASN and a country) before an atomic
    rename: a bad download never replaces a good file, and one that unpacks past
    ``max_unpacked_bytes`` (default 1 GiB) is stopped there. Early in a month, before the
    release is published, a valid installed file is kept (else last month's is used).
    """
    directory = settings.geoip_dir()
    directory.mkdir(parents=True, exist_ok=True)
    template = settings.env("OONI_GEOIP_URL_TEMPLATE", settings.DEFAULT_GEOIP_URL_TEMPLATE)
    today = _today(config)
    wanted = release_ver(today)
    installed, info = installed_release(directory)
    start = time.monotonic()
    base = {"wanted_release": wanted, "path": dg.MetadataValue.path(str(directory / DB_NAME))}

    if installed == wanted and info is not None:
        context.log.info(f"release {wanted} already installed and valid: nothing to do")
        return dg.MaterializeResult(
            data_version=dg.DataVersion(wanted),
            metadata={**base, **_info_metadata(info), "release": wanted, "skipped": True},
        )

    candidates = [wanted] if info is not None else [wanted, release_ver(previous_month(today))]
    for release in candidates:
        url = template.format(ver=release)
        try:
            info, compressed, size = _download(
                url, directory, config.max_unpacked_bytes, context.log
            )
        except NotPublished as exc:
            context.log.warning(f"release {release} not published yet: {exc}")
            continue
        write_atomically(directory / TS_NAME, release)
        return dg.MaterializeResult(
            data_version=dg.DataVersion(release),
            metadata={
                **base,
                **_info_metadata(info),
                "release": release,
                "skipped": False,
                "fallback_to_previous_month": release != wanted,
                "bytes_downloaded": compressed,
                "bytes": size,
                "duration_s": round(time.monotonic() - start, 3),
                "source_url": url,
            },
        )

    if info is not None:
        context.log.warning(
            f"release {wanted} not published yet: keeping the installed {installed}"
        )
        return dg.MaterializeResult(
            data_version=dg.DataVersion(installed or "unknown"),
            metadata={
                **base,
                **_info_metadata(info),
                "release": installed or "",
                "skipped": True,
                "kept_previous": True,
            },
        )
    raise GeoIPError(
        f"no usable GeoIP database: neither {candidates[0]} nor {candidates[-1]} is published "
        f"(template {template}), and none is installed in {directory}"
    )


def _info_metadata(info: MmdbInfo) -> dict:
    return {
        "node_count": info.node_count,
        "build_epoch": info.build_epoch,
        "built_at": info.built_at,
        "ip_version": info.ip_version,
        "database_type": info.database_type,
    }


@dg.asset_check(
    asset=geoip_db,
    description="The installed file opens and 8.8.8.8 resolves to an integer ASN and a country.",
)
def geoip_db_lookup_check() -> dg.AssetCheckResult:
    path = settings.geoip_dir() / DB_NAME
    try:
        info = verify_mmdb(path)
    except (GeoIPError, FileNotFoundError) as exc:
        return dg.AssetCheckResult(passed=False, metadata={"error": str(exc)})
    return dg.AssetCheckResult(
        passed=True,
        metadata={
            "probe_asn": info.probe_asn,
            "probe_country": info.probe_country,
            "node_count": info.node_count,
        },
    )
