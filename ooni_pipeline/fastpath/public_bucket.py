"""OONI's open measurement bucket: where an upload day's postcans are, and who may read them.

Layout (ooni/backend ``api/ooni_api_uploader.py``, commit 5763024f):
``raw/YYYYMMDD/HH/CC/<testname without underscores>/YYYYMMDDHH_CC_<testname>.n<collector>.<counter>.tar.gz``,
a "postcan" of about 20 MB whose members are ``.../<measurement_uid>.post``, each
``{"format": "json"|"yaml", "content": {...}}``. A ``.jsonl.gz`` with the same stem
carries the same measurements without their uid, so only postcans are read.
The date and hour are when OONI *received* the measurements: a late upload of
day D sits under a later day.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

DEFAULT_BUCKET = "ooni-data-eu-fra"
DEFAULT_REGION = "eu-central-1"
DEFAULT_TEST_NAMES = ("web_connectivity",)

_COUNTRY = re.compile(r"^[A-Z]{2}$")
_TEST_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
_DAY = re.compile(r"^\d{8}$")


def parse_countries(value: str | None) -> tuple[str, ...]:
    """``OONI_PUBLIC_COUNTRIES``: a comma list of probe country codes; empty means all."""
    countries = tuple(sorted({c.strip().upper() for c in (value or "").split(",") if c.strip()}))
    bad = [c for c in countries if not _COUNTRY.match(c)]
    if bad:
        raise ValueError(f"OONI_PUBLIC_COUNTRIES: not two-letter country codes: {bad!r}")
    return countries


def parse_test_names(value: str | None) -> tuple[str, ...]:
    names = tuple(sorted({n.strip() for n in (value or "").split(",") if n.strip()}))
    bad = [n for n in names if not _TEST_NAME.match(n)]
    if bad:
        raise ValueError(f"test names must be lower-case words with underscores: {bad!r}")
    return names or DEFAULT_TEST_NAMES


@dataclass(frozen=True)
class PublicBucket:
    """Where to read postcans: OONI's bucket (anonymous) or another endpoint with its layout."""

    bucket: str = DEFAULT_BUCKET
    endpoint_url: str | None = None
    countries: tuple[str, ...] = ()
    test_names: tuple[str, ...] = field(default=DEFAULT_TEST_NAMES)

    def __post_init__(self) -> None:
        if not _BUCKET.match(self.bucket):
            raise ValueError(f"invalid bucket name {self.bucket!r}")
        if self.endpoint_url and not re.match(
            r"^https?://[A-Za-z0-9.\-\[\]:]+/?$", self.endpoint_url
        ):
            raise ValueError("OONI_PUBLIC_ENDPOINT_URL must be http(s)://host[:port]")

    @property
    def base_url(self) -> str:
        """Path-style HTTP(S) address of the bucket (for metadata)."""
        if self.endpoint_url:
            return f"{self.endpoint_url.rstrip('/')}/{self.bucket}"
        return f"https://{self.bucket}.s3.{DEFAULT_REGION}.amazonaws.com"

    def day_prefix(self, day: str) -> str:
        """``raw/YYYYMMDD/`` of an upload day given as YYYY-MM-DD."""
        compact = day.replace("-", "")
        if not _DAY.match(compact):
            raise ValueError(f"invalid upload day {day!r}")
        return f"raw/{compact}/"

    def is_postcan(self, key: str) -> bool:
        """Whether a listed key is a postcan this configuration reads."""
        parts = key.split("/")
        if len(parts) != 6 or not key.endswith(".tar.gz"):
            return False
        country, test = parts[3], parts[4]
        return (not self.countries or country in self.countries) and test in {
            n.replace("_", "") for n in self.test_names
        }

    def list_postcans(self, day: str) -> list[tuple[str, int]]:
        """(key, size) of the day's postcans, listed anonymously (boto3 ``UNSIGNED``)."""
        client = self._client
        found: list[tuple[str, int]] = []
        paginator = client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self.day_prefix(day)):
            for item in page.get("Contents", []):
                if self.is_postcan(item["Key"]):
                    found.append((item["Key"], int(item["Size"])))
        return found

    def open(self, key: str) -> Any:
        """A streaming reader of one object (read anonymously)."""
        return self._client.get_object(Bucket=self.bucket, Key=key)["Body"]

    @cached_property
    def _client(self) -> Any:
        import boto3
        from botocore import UNSIGNED
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=DEFAULT_REGION,
            config=Config(
                signature_version=UNSIGNED, retries={"max_attempts": 5, "mode": "standard"}
            ),
        )
