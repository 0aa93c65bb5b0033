"""Clients of engines: MLflow registry, DuckDB warehouse, Dask (no Dagster here)."""
