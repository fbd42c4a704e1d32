"""ASN metadata updater: the AS-to-organisation map, weekly."""

# Measured (bench/bench_asnmeta.py): smaller batches make more parts for chdb to
# merge, larger ones hold more entries in Python; 20k is the low point of peak RSS.
# Here, not in load.py: the asset's config reads it when the code location loads,
# and load.py brings the parser's numpy and pyarrow with it.
DEFAULT_BATCH_ROWS = 20_000
