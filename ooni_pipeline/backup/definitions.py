"""Database backup: ClickHouse tables to the object store as zstd CSV, weekly.

The tables are OONI's default (``plan.DEFAULT_TABLES``) unless
``OONI_BACKUP_TABLES`` (``table[:month_column],...``) says otherwise when the
code location loads.
"""

import dagster as dg

from ooni_pipeline import settings
from ooni_pipeline.backup.assets import build_backup_asset
from ooni_pipeline.backup.plan import DEFAULT_TABLES, parse_tables
from ooni_pipeline.common import asset_schedule

_spec = settings.env("OONI_BACKUP_TABLES")
BACKUP_TABLES = parse_tables(_spec) if _spec else DEFAULT_TABLES
_built = [build_backup_asset(spec) for spec in BACKUP_TABLES]
backup_assets = [asset for asset, _ in _built]
backup_checks = [check for _, check in _built]

backup_schedule = asset_schedule(
    "backup",
    dg.AssetSelection.groups("backup"),
    "0 2 * * 6",
    description="Back up ClickHouse tables to S3",
)

defs = dg.Definitions(assets=backup_assets, asset_checks=backup_checks, schedules=[backup_schedule])
