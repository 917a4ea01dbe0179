"""Personalisation domain logic, pure (no Kafka, no DuckDB): the item-to-item recommendation
model, its baselines and offline evaluation, and experiment assignment. The stream processors
(:mod:`streams`) and read models (:mod:`projections`) call into it."""
