"""Read models: projection runners that materialise topics into DuckDB tables (offsets stored
in the same transaction, so exactly-once) and append-only facts into a Parquet lake.

Modules: :mod:`~projections.readmodels` (definitions and the pure event → row mapping),
:mod:`~projections.decoding` (records → Arrow), :mod:`~projections.apply` (one batch, one
transaction), :mod:`~projections.tracking` (offsets tied to the log's identity, reset),
:mod:`~projections.lake` (Parquet files), :mod:`~projections.store` (sharing the DuckDB file
between the writer and readers), :mod:`~projections.runner` (the loop; ``python -m
projections.runner``) and :mod:`~projections.sql` (``backbeat sql``).
"""
