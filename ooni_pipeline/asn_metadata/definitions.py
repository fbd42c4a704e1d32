"""ASN metadata updater: the AS-to-organisation map, weekly."""

import dagster as dg

from ooni_pipeline.asn_metadata.assets import asnmeta, asnmeta_rows_check
from ooni_pipeline.common import asset_schedule

asnmeta_schedule = asset_schedule(
    "asnmeta", [asnmeta], "0 3 * * 1", description="Refresh the ASN metadata"
)

defs = dg.Definitions(
    assets=[asnmeta], asset_checks=[asnmeta_rows_check], schedules=[asnmeta_schedule]
)
