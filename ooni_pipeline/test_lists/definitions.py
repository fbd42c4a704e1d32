"""Test-list updater: the CitizenLab test lists, every 30 minutes."""

import dagster as dg

from ooni_pipeline.common import asset_schedule
from ooni_pipeline.test_lists.assets import citizenlab, citizenlab_rows_valid_check

citizenlab_schedule = asset_schedule(
    "citizenlab",
    [citizenlab],
    "*/30 * * * *",
    retry=False,  # the next tick, 30 minutes on, is the retry
    description="Refresh the CitizenLab test lists",
)

defs = dg.Definitions(
    assets=[citizenlab], asset_checks=[citizenlab_rows_valid_check], schedules=[citizenlab_schedule]
)
