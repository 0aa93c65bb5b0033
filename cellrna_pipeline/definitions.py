"""The Dagster entry point (``workspace.yaml`` loads ``cellrna_pipeline.definitions``)."""

from cellrna_pipeline.defs import build_definitions

defs = build_definitions()
