"""Database backup: ClickHouse tables to the object store as zstd CSV, weekly."""
