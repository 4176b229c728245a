"""Reading and writing ``manifest.json``, the index of a prepared folder.

The manifest is the only metadata the trainer trusts: table locations (relative to the prepared
folder), row counts, quarantine counts, vocab sizes, the feature spec, the split boundary, a hash
of the resolved config and library versions. Each Spark job merges its own section into it.

Paths may be local or any URI pyarrow understands (``hdfs://``, ``s3://``, ``gs://``), so the
same code serves a laptop and a cluster.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import pyarrow.fs as pafs

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1


def _fs_and_path(uri: str) -> tuple[pafs.FileSystem, str]:
    fs, path = pafs.FileSystem.from_uri(uri if "://" in uri else _abs(uri))
    return fs, path


def _abs(path: str) -> str:
    import os

    return os.path.abspath(path)


def join(base: str, *parts: str) -> str:
    out = base.rstrip("/")
    for p in parts:
        out = f"{out}/{p.strip('/')}"
    return out


def read_manifest(prepared: str) -> dict[str, Any]:
    """Load ``<prepared>/manifest.json``; a clear error says how to produce it when missing."""
    fs, path = _fs_and_path(join(prepared, MANIFEST_NAME))
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(
            f"no manifest at {join(prepared, MANIFEST_NAME)}: the prepared folder is missing or "
            f"incomplete. Run `python -m spark_jobs.prepare --config <config>` first "
            f"(paths.prepared must point at its output)."
        )
    with fs.open_input_stream(path) as fh:
        return json.loads(fh.read().decode())


def manifest_exists(prepared: str) -> bool:
    fs, path = _fs_and_path(join(prepared, MANIFEST_NAME))
    return fs.get_file_info(path).type == pafs.FileType.File


def write_manifest(prepared: str, manifest: dict[str, Any]) -> None:
    """Write atomically: a temporary file in the same folder, then a rename over the old one."""
    fs, folder = _fs_and_path(prepared)
    fs.create_dir(folder, recursive=True)
    tmp = f"{folder}/.{MANIFEST_NAME}.{uuid.uuid4().hex}.tmp"
    blob = json.dumps(manifest, indent=2, sort_keys=True, default=str).encode()
    with fs.open_output_stream(tmp) as fh:
        fh.write(blob)
    fs.move(tmp, f"{folder}/{MANIFEST_NAME}")


def merge_sections(prepared: str, sections: dict[str, Any]) -> dict[str, Any]:
    """Read-modify-write top-level sections of the manifest (creating it if needed).

    Used when one job is rerun on its own; ``spark_jobs.prepare`` writes the whole manifest once.
    """
    manifest = read_manifest(prepared) if manifest_exists(prepared) else {"version": MANIFEST_VERSION}
    manifest.update(sections)
    write_manifest(prepared, manifest)
    return manifest
