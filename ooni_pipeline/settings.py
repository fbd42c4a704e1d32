"""The project's configuration: environment variables read at run time, never at import.

Every variable is optional (see ``CONTRACT.md``); the defaults give a self-contained
embedded deployment under ``$OONI_DATA_DIR``.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_TEST_LISTS_REPO = "https://github.com/citizenlab/test-lists.git"
DEFAULT_FINGERPRINTS_DNS_URL = (
    "https://raw.githubusercontent.com/ooni/blocking-fingerprints/main/fingerprints_dns.csv"
)
DEFAULT_FINGERPRINTS_HTTP_URL = (
    "https://raw.githubusercontent.com/ooni/blocking-fingerprints/main/fingerprints_http.csv"
)
DEFAULT_ASNMETA_URL = "https://archive.org/download/ip2country-as/all_as_org_map.json"
DEFAULT_GEOIP_URL_TEMPLATE = (
    "https://github.com/ooni/historical-geoip/releases/download/{ver}/{ver}-ip2country_as.mmdb.gz"
)


def env(name: str, default: str | None = None) -> str | None:
    """An environment variable, with empty strings treated as unset."""
    value = os.environ.get(name, "").strip()
    return value or default


def data_dir() -> Path:
    """Root of the embedded state (chdb data, local object store, GeoIP files)."""
    return Path(env("OONI_DATA_DIR") or Path.cwd() / ".ooni").absolute()


def geoip_dir() -> Path:
    return Path(env("OONI_GEOIP_DIR") or data_dir() / "geoip").absolute()
