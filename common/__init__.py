"""Shared, framework-free pieces: config, feature specs, manifest, towers, augmentations, losses
and metrics. Nothing here imports Spark or Ray."""
