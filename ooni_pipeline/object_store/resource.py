"""The Dagster resource that hands assets an ``ObjectStore``."""

from __future__ import annotations

import dagster as dg
from pydantic import Field

from ooni_pipeline import settings
from ooni_pipeline.object_store.stores import LocalObjectStore, ObjectStore, S3ObjectStore


class ObjectStoreResource(dg.ConfigurableResource):
    """S3 when a bucket is set (``OONI_S3_BUCKET``), else ``$OONI_DATA_DIR/objects``.

    Unset fields are read from the environment when a run starts; credentials come
    from boto3's own chain (``AWS_ACCESS_KEY_ID``...) and never pass through here.
    """

    bucket: str | None = Field(default=None, description="S3 bucket; default $OONI_S3_BUCKET")
    endpoint_url: str | None = Field(
        default=None, description="S3-compatible endpoint; default $OONI_S3_ENDPOINT_URL"
    )
    region_name: str | None = Field(default=None, description="default $AWS_REGION")
    local_dir: str | None = Field(
        default=None, description="used when no bucket; default $OONI_DATA_DIR/objects"
    )
    part_size_mb: int = Field(
        default=16, description="multipart upload part size (MiB, at least 5)"
    )

    def get_store(self) -> ObjectStore:
        bucket = self.bucket or settings.env("OONI_S3_BUCKET")
        if not bucket:
            return LocalObjectStore(self.local_dir or settings.data_dir() / "objects")
        # dagster_aws (with the Dagster components it pulls in) costs about a second
        # to import: only a run that writes to S3 pays for it, not every code load.
        from dagster_aws.s3 import S3Resource

        s3 = S3Resource(
            endpoint_url=self.endpoint_url or settings.env("OONI_S3_ENDPOINT_URL"),
            region_name=self.region_name
            or settings.env("AWS_REGION")
            or settings.env("AWS_DEFAULT_REGION"),
        )
        return S3ObjectStore(s3.get_client(), bucket, part_size=self.part_size_mb * 1024 * 1024)
