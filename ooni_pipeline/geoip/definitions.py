"""GeoIP downloader: the monthly IP-to-country+ASN mmdb, weekly on Sunday."""

import dagster as dg

from ooni_pipeline.common import asset_schedule
from ooni_pipeline.geoip.assets import geoip_db, geoip_db_lookup_check

geoip_db_schedule = asset_schedule(
    "geoip_db", [geoip_db], "0 0 * * 0", description="Install this month's GeoIP database"
)

defs = dg.Definitions(
    assets=[geoip_db], asset_checks=[geoip_db_lookup_check], schedules=[geoip_db_schedule]
)
