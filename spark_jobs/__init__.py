"""PySpark preparation jobs. They never import torch or ``ray_train``; they meet the trainer only
through the Parquet tables and ``manifest.json`` they write."""
