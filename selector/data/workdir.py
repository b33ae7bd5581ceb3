"""The job's work directory: per-shard stage outputs that make a killed job resumable.

Layout (any fsspec URI: local path, ``file://``, ``s3://``, ``gs://``)::

    <root>/runs/<run_id>/<stage>/<shard_key>.<ext>        the output (parquet / npy / safetensors / json)
    <root>/runs/<run_id>/<stage>/<shard_key>.done.json    written after the output: config hash + stats
    <root>/runs/<run_id>/state/<name>.json                small state (bandit checkpoints, fitted info)

A stage skips a shard when its ``.done.json`` exists with the same config hash, so re-running
a job resumes it. Outputs are written atomically: a local file through a temporary name and
``os.replace``; an object store object by a single PUT (which is atomic). The marker is
written last, so a crash leaves at worst an output without a marker, which is redone.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import time
import uuid
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def stable_hash(obj: Any, length: int = 16) -> str:
    """A hash of a JSON-able object that does not depend on key order or the process."""
    blob = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def shard_key(relpath: str) -> str:
    """A file-name-safe, collision-free key for a shard's relative path."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", relpath.replace("/", "__"))[-80:]
    return f"{readable}-{hashlib.sha1(relpath.encode()).hexdigest()[:8]}"


def open_fs(uri: str, storage_options: dict | None = None):
    """``(filesystem, path)`` for a URI; plain paths are local files. Object stores get the
    retry policy of :mod:`selector.data.storage` (bounded by ``storage.retry_seconds``)."""
    from selector.data.storage import open_filesystem

    fs, path = open_filesystem(uri, storage_options)
    return fs, path.rstrip("/") if path not in ("/", "") else path


def is_local(fs) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


def atomic_write_bytes(fs, path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either nothing or the whole object."""
    parent = path.rsplit("/", 1)[0]
    if is_local(fs):
        os.makedirs(parent, exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    else:
        fs.pipe_file(path, data)  # one PUT: atomic on S3/GCS


def table_to_parquet_bytes(table: pa.Table, row_group_size: int | None = None) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd", row_group_size=row_group_size)
    return sink.getvalue()


class WorkDir:
    """The per-run work directory of a job (see the module docstring for the layout)."""

    def __init__(self, root: str, run_id: str, storage_options: dict | None = None):
        if not run_id or "/" in run_id:
            raise ValueError(f"run_id must be a non-empty name without '/': {run_id!r}")
        self.root = root
        self.run_id = run_id
        self.storage_options = dict(storage_options or {})
        self.fs, root_path = open_fs(root, self.storage_options)
        self.path = f"{root_path}/runs/{run_id}"

    # -- paths ---------------------------------------------------------------------------
    def stage_dir(self, stage: str) -> str:
        return f"{self.path}/{stage}"

    def uri(self, stage: str, filename: str) -> str:
        """A full URI (with protocol) of a file in ``stage``, for libraries that open URIs themselves."""
        path = f"{self.stage_dir(stage)}/{filename}"
        if is_local(self.fs):
            return path
        protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        return f"{protocol}://{path}"

    def _output(self, stage: str, key: str, ext: str) -> str:
        return f"{self.stage_dir(stage)}/{key}.{ext}"

    def _marker(self, stage: str, key: str) -> str:
        return f"{self.stage_dir(stage)}/{key}.done.json"

    # -- resumability --------------------------------------------------------------------
    def is_done(self, stage: str, key: str, config_hash: str) -> bool:
        """True when ``stage`` already produced ``key`` under the same config hash."""
        marker = self.read_marker(stage, key)
        return marker is not None and marker.get("config_hash") == config_hash

    def read_marker(self, stage: str, key: str) -> dict | None:
        path = self._marker(stage, key)
        if not self.fs.exists(path):
            return None
        with self.fs.open(path, "rb") as f:
            return json.loads(f.read())

    def mark_done(self, stage: str, key: str, config_hash: str, stats: dict | None = None) -> None:
        payload = {"config_hash": config_hash, "created_at": time.time(), "stats": stats or {}}
        atomic_write_bytes(self.fs, self._marker(stage, key), json.dumps(payload, default=str).encode())

    def done_keys(self, stage: str, config_hash: str) -> set[str]:
        """Keys of ``stage`` finished under ``config_hash``."""
        directory = self.stage_dir(stage)
        if not self.fs.exists(directory):
            return set()
        keys = set()
        for path in self.fs.ls(directory, detail=False):
            name = path.rsplit("/", 1)[-1]
            if name.endswith(".done.json"):
                key = name[: -len(".done.json")]
                if self.is_done(stage, key, config_hash):
                    keys.add(key)
        return keys

    # -- tables (parquet) ----------------------------------------------------------------
    def write_table(self, stage: str, key: str, table: pa.Table, config_hash: str, stats: dict | None = None,
                    row_group_size: int | None = None) -> str:
        """Write a stage's table output for ``key``, then its done marker."""
        path = self._output(stage, key, "parquet")
        atomic_write_bytes(self.fs, path, table_to_parquet_bytes(table, row_group_size))
        self.mark_done(stage, key, config_hash, stats)
        return path

    def iter_row_groups(self, stage: str, key: str, columns: list[str] | None = None):
        """``key``'s table one row group at a time, the file opened per group (so thousands of
        these generators can be open at once without as many file handles)."""
        path = self._output(stage, key, "parquet")
        with self.fs.open(path, "rb") as f:
            groups = pq.ParquetFile(f).metadata.num_row_groups
        for i in range(groups):
            with self.fs.open(path, "rb") as f:
                yield pq.ParquetFile(f).read_row_group(i, columns=columns)

    def read_table(self, stage: str, key: str, columns: list[str] | None = None) -> pa.Table:
        path = self._output(stage, key, "parquet")
        with self.fs.open(path, "rb") as f:
            return pq.read_table(f, columns=columns)

    # -- arrays (npy) --------------------------------------------------------------------
    def write_array(self, stage: str, key: str, array: np.ndarray, config_hash: str, stats: dict | None = None) -> str:
        """Write a numpy array (e.g. float16 embeddings) for ``key``, then its done marker."""
        path = self._output(stage, key, "npy")
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
        atomic_write_bytes(self.fs, path, buf.getvalue())
        self.mark_done(stage, key, config_hash, stats)
        return path

    def read_array(self, stage: str, key: str) -> np.ndarray:
        with self.fs.open(self._output(stage, key, "npy"), "rb") as f:
            return np.load(io.BytesIO(f.read()), allow_pickle=False)

    # -- raw bytes (safetensors etc.) ----------------------------------------------------
    def write_bytes(self, stage: str, key: str, ext: str, data: bytes, config_hash: str,
                    stats: dict | None = None) -> str:
        path = self._output(stage, key, ext)
        atomic_write_bytes(self.fs, path, data)
        self.mark_done(stage, key, config_hash, stats)
        return path

    def read_bytes(self, stage: str, key: str, ext: str) -> bytes:
        with self.fs.open(self._output(stage, key, ext), "rb") as f:
            return f.read()

    # -- small JSON state ----------------------------------------------------------------
    def write_state(self, name: str, obj: Any) -> None:
        atomic_write_bytes(self.fs, f"{self.path}/state/{name}.json", json.dumps(obj, default=str).encode())

    def read_state(self, name: str) -> Any | None:
        path = f"{self.path}/state/{name}.json"
        if not self.fs.exists(path):
            return None
        with self.fs.open(path, "rb") as f:
            return json.loads(f.read())

    # -- rejects (quarantined records) ---------------------------------------------------
    def rejects_path(self, key: str) -> str:
        return f"{self.path}/rejects/{key}.jsonl"
