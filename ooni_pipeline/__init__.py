"""OONI's data jobs as Dagster software-defined assets."""
