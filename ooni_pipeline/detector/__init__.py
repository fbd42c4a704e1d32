"""The blocking detector: hourly blocking status per (country, network, domain),
grouped into events per (country, domain), with Atom feeds and chat messages.

Modules: ``sql`` (what ClickHouse computes), ``cusum`` (OONI's state-aware CUSUM,
vectorised), ``status`` (the detector pass over hours), ``events`` (episodes and
their stable ids), ``feeds`` (Atom), ``announce`` (chat messages), ``pipeline`` (one
pass of all of them), ``assets`` and ``definitions`` (Dagster).
"""
