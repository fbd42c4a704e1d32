"""Where exports and backups go: an S3 bucket, or a local directory with the same keys.

``ObjectStoreResource`` (the Dagster resource) is imported on first use, so the
stores and the streaming upload stay importable without Dagster.
"""

from typing import Any

from ooni_pipeline.object_store.stores import LocalObjectStore, ObjectStore, S3ObjectStore
from ooni_pipeline.object_store.upload import UploadResult, stream_upload

__all__ = [
    "LocalObjectStore",
    "ObjectStore",
    "ObjectStoreResource",
    "S3ObjectStore",
    "UploadResult",
    "stream_upload",
]


def __getattr__(name: str) -> Any:
    if name == "ObjectStoreResource":
        from ooni_pipeline.object_store.resource import ObjectStoreResource

        return ObjectStoreResource
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
