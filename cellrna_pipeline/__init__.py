"""cellrna-pipeline."""
