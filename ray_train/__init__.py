"""Ray Train side: data ingest, the distributed training loop, evaluation and export. It never
imports ``spark_jobs``; it reads the prepared Parquet tables and ``manifest.json``."""
