"""Selection manifests: the product of a run, written once and committed atomically.

Layout under ``<root>/manifests/``::

    <run_id>/part-00000.parquet ...   selected documents (schema ``MANIFEST_SCHEMA``)
    <run_id>/manifest.json            run id, created-at, redacted config, config hash, corpus
                                      snapshot, models, tokenizer, budget, counts, versions, parts
    <run_id>/_SUCCESS                 written last; readers ignore a manifest without it
    <run_id>/<extra>                  optional side files staged with ``write_extra`` (e.g. the
                                      refresh job's ``delta.parquet``), listed in ``extras``

The writer stages everything under ``_staging/<run_id>-<nonce>/`` and commits by copying the
parts and ``manifest.json`` into ``<run_id>/`` and writing ``_SUCCESS`` last. A committed
manifest is never rewritten: committing onto one raises :class:`ManifestError`. A
``<run_id>/`` without ``_SUCCESS`` is the debris of a crashed commit and is replaced.
The reader refuses an uncommitted manifest and checks every part listed in
``manifest.json`` exists with its recorded row count.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import uuid
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from selector.errors import ManifestError
from selector.data.workdir import atomic_write_bytes, open_fs, table_to_parquet_bytes

MANIFEST_SCHEMA = pa.schema([
    pa.field("doc_id", pa.string(), nullable=False),
    pa.field("shard", pa.string(), nullable=False),       # shard URI
    pa.field("row", pa.int64(), nullable=False),
    pa.field("n_tokens", pa.int64(), nullable=False),
    pa.field("cluster", pa.int32()),                       # null when the method did not cluster
    pa.field("method", pa.string(), nullable=False),
    pa.field("score", pa.float64()),                       # null when the method does not score
    pa.field("weight", pa.float64(), nullable=False),      # 1.0 unless the method weights (GTP)
    pa.field("round", pa.int32()),                         # bandit round; null otherwise
    pa.field("token_mask", pa.binary()),                   # np.packbits(mask, bitorder="little")
])

SUCCESS = "_SUCCESS"
MANIFEST_JSON = "manifest.json"


def manifests_root(root: str) -> str:
    return f"{root.rstrip('/')}/manifests"


def manifest_uri(root: str, run_id: str) -> str:
    return f"{manifests_root(root)}/{run_id}"


def selection_table(rows: dict[str, list] | pa.Table) -> pa.Table:
    """A table in ``MANIFEST_SCHEMA`` from columns (lists, numpy or Arrow arrays, or a table's columns);
    missing optional columns are null."""
    if isinstance(rows, pa.Table):
        rows = {name: rows[name] for name in rows.column_names}
    n = len(rows["doc_id"])
    columns = {}
    for fld in MANIFEST_SCHEMA:
        values = rows.get(fld.name)
        if values is None:
            if not fld.nullable and fld.name != "weight":
                raise ManifestError(f"selection is missing required column {fld.name!r}")
            values = pa.repeat(pa.scalar(1.0), n) if fld.name == "weight" else pa.nulls(n, fld.type)
        if len(values) != n:
            raise ManifestError(f"column {fld.name!r} has {len(values)} values for {n} documents")
        columns[fld.name] = (values.cast(fld.type) if isinstance(values, (pa.Array, pa.ChunkedArray))
                             else pa.array(values, type=fld.type))
    return pa.Table.from_pydict(columns, schema=MANIFEST_SCHEMA)


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("thresher", "torch", "transformers", "pyarrow", "ray", "faiss-cpu", "faiss-gpu", "numpy"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            continue
    return out


COMMIT_PAUSE_ENV = "THRESHER_COMMIT_PAUSE"


def _pause_point(name: str) -> None:
    """Fault-injection hook for tests/test_faults.py: with ``THRESHER_COMMIT_PAUSE=<name>`` the commit
    stops at that point (``after_parts``: parts copied, no manifest.json; ``before_success``: all but
    ``_SUCCESS``) so the test can kill the process there."""
    if os.environ.get(COMMIT_PAUSE_ENV) == name:
        import sys
        import time

        print(f"commit paused at {name}", file=sys.stderr, flush=True)
        time.sleep(3600)


class ManifestWriter:
    """Stage parts, then :meth:`commit` with the summary. Use once per run."""

    def __init__(self, root: str, run_id: str, storage_options: dict | None = None, rows_per_part: int = 100_000):
        self.root, self.run_id = root, run_id
        self.fs, root_path = open_fs(root, storage_options)
        self.final = f"{root_path}/manifests/{run_id}"
        self.staging = f"{root_path}/manifests/_staging/{run_id}-{uuid.uuid4().hex[:10]}"
        self.rows_per_part = rows_per_part
        self.parts: list[dict[str, Any]] = []
        self.extras: list[str] = []
        if self.fs.exists(f"{self.final}/{SUCCESS}"):
            raise ManifestError(f"manifest {manifest_uri(root, run_id)} is already committed; a manifest is never "
                                "rewritten — use a new run_id")

    def write(self, table: pa.Table) -> None:
        """Stage ``table`` (``MANIFEST_SCHEMA``) as one or more parts."""
        if table.schema != MANIFEST_SCHEMA:
            table = table.select(MANIFEST_SCHEMA.names).cast(MANIFEST_SCHEMA)
        for start in range(0, max(table.num_rows, 1), self.rows_per_part):
            chunk = table.slice(start, self.rows_per_part)
            if chunk.num_rows == 0 and self.parts:
                break
            name = f"part-{len(self.parts):05d}.parquet"
            atomic_write_bytes(self.fs, f"{self.staging}/{name}", table_to_parquet_bytes(chunk))
            self.parts.append({"name": name, "rows": chunk.num_rows})

    def write_extra(self, name: str, data: bytes) -> None:
        """Stage a side file (e.g. ``delta.parquet``) that :meth:`commit` copies in before ``_SUCCESS``."""
        if not name or "/" in name or name.startswith(("_", ".")) or name == MANIFEST_JSON or name.startswith("part-"):
            raise ManifestError(f"invalid extra file name {name!r}: a plain name, not a part, "
                                f"{MANIFEST_JSON} or a hidden/underscore name")
        atomic_write_bytes(self.fs, f"{self.staging}/{name}", data)
        if name not in self.extras:
            self.extras.append(name)

    def commit(self, summary: dict[str, Any]) -> str:
        """Move the staged parts into place, write ``manifest.json``, then ``_SUCCESS``."""
        if not self.parts:
            self.write(MANIFEST_SCHEMA.empty_table())
        if self.fs.exists(f"{self.final}/{SUCCESS}"):
            raise ManifestError(f"manifest {manifest_uri(self.root, self.run_id)} was committed by another writer")
        if self.fs.exists(self.final):
            self.fs.rm(self.final, recursive=True)  # debris of a crashed commit (no _SUCCESS)
        body = dict(summary)
        body.update({
            "run_id": self.run_id,
            "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(),
            "parts": self.parts,
            "n_documents": sum(p["rows"] for p in self.parts),
            "versions": versions(),
            "schema": [f.name for f in MANIFEST_SCHEMA],
        })
        if self.extras:
            body["extras"] = list(self.extras)
        self.fs.makedirs(self.final, exist_ok=True)
        for part in self.parts:
            self.fs.copy(f"{self.staging}/{part['name']}", f"{self.final}/{part['name']}")
        for name in self.extras:
            self.fs.copy(f"{self.staging}/{name}", f"{self.final}/{name}")
        _pause_point("after_parts")
        atomic_write_bytes(self.fs, f"{self.final}/{MANIFEST_JSON}", json.dumps(body, indent=2, default=str).encode())
        _pause_point("before_success")
        atomic_write_bytes(self.fs, f"{self.final}/{SUCCESS}", b"")
        try:
            self.fs.rm(self.staging, recursive=True)
        except FileNotFoundError:
            pass
        return manifest_uri(self.root, self.run_id)


@dataclass
class Manifest:
    """A committed manifest: its summary and its rows."""

    uri: str
    summary: dict[str, Any]
    table: pa.Table

    def __len__(self) -> int:
        return self.table.num_rows

    @property
    def selected_tokens(self) -> int:
        return int(pc.sum(self.table["n_tokens"]).as_py() or 0)

    def token_masks(self) -> Iterable[np.ndarray | None]:
        """Unpacked boolean masks (one per row, ``n_tokens`` long), or None where absent."""
        for packed, n in zip(self.table["token_mask"].to_pylist(), self.table["n_tokens"].to_pylist()):
            yield None if packed is None else unpack_mask(packed, n)


def pack_mask(mask: np.ndarray) -> bytes:
    """Bit-pack a boolean token mask (little bit order: token i is bit i%8 of byte i//8)."""
    return np.packbits(np.asarray(mask, dtype=bool), bitorder="little").tobytes()


def unpack_mask(packed: bytes, n: int) -> np.ndarray:
    """The ``n``-token boolean mask from :func:`pack_mask` bytes."""
    need = (n + 7) // 8
    if len(packed) != need:
        raise ManifestError(f"packed mask has {len(packed)} bytes; {n} tokens need {need}")
    return np.unpackbits(np.frombuffer(packed, dtype=np.uint8), count=n, bitorder="little").astype(bool)


def read_manifest(uri: str, storage_options: dict | None = None, columns: list[str] | None = None,
                  head: int | None = None) -> Manifest:
    """Read a committed manifest; refuse an uncommitted or partial one with a clear error.

    ``head``: only the first ``head`` rows are read (for showing a manifest: O(head), whatever its
    size); every part is still checked to exist with the row count manifest.json gives, from the
    Parquet footers alone."""
    fs, path = open_fs(uri, storage_options)
    if not fs.exists(path):
        raise ManifestError(f"no manifest at {uri}")
    if not fs.exists(f"{path}/{SUCCESS}"):
        raise ManifestError(f"manifest {uri} is not committed (no {SUCCESS}): it is being written or its job "
                            "died; readers ignore it")
    try:
        with fs.open(f"{path}/{MANIFEST_JSON}", "rb") as f:
            summary = json.loads(f.read())
    except FileNotFoundError as exc:
        raise ManifestError(f"manifest {uri} has {SUCCESS} but no {MANIFEST_JSON}: partial manifest") from exc
    tables = []
    wanted = None if head is None else max(0, int(head))
    for part in summary.get("parts", []):
        part_path = f"{path}/{part['name']}"
        if not fs.exists(part_path):
            raise ManifestError(f"manifest {uri} is partial: {part['name']} is missing")
        with fs.open(part_path, "rb") as f:
            if wanted is None:
                table = pq.read_table(f, columns=columns)
                n_rows = table.num_rows
            else:
                pf = pq.ParquetFile(f)
                n_rows = pf.metadata.num_rows
                table = None
                if wanted > 0:
                    table = _first_rows(pf, wanted, columns)
                    wanted -= table.num_rows
        if n_rows != part["rows"]:
            raise ManifestError(f"manifest {uri} is partial: {part['name']} has {n_rows} rows, "
                                f"manifest.json says {part['rows']}")
        if table is not None:
            tables.append(table)
    if tables:
        table = pa.concat_tables(tables)
    else:
        table = MANIFEST_SCHEMA.empty_table() if columns is None else MANIFEST_SCHEMA.empty_table().select(columns)
    return Manifest(uri=uri, summary=summary, table=table)


def _first_rows(pf: pq.ParquetFile, n: int, columns: list[str] | None) -> pa.Table:
    """The first ``n`` rows of a Parquet file, reading only the row groups that hold them."""
    parts, have = [], 0
    for g in range(pf.num_row_groups):
        if have >= n:
            break
        t = pf.read_row_group(g, columns=columns)
        parts.append(t)
        have += t.num_rows
    return pa.concat_tables(parts).slice(0, n)


def list_manifests(root: str, storage_options: dict | None = None) -> list[dict[str, Any]]:
    """Summaries of the committed manifests under ``<root>/manifests``, oldest first."""
    fs, root_path = open_fs(root, storage_options)
    base = f"{root_path}/manifests"
    if not fs.exists(base):
        return []
    out = []
    for entry in fs.ls(base, detail=False):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        if name.startswith("_") or not fs.exists(f"{entry}/{SUCCESS}"):
            continue
        with fs.open(f"{entry}/{MANIFEST_JSON}", "rb") as f:
            summary = json.loads(f.read())
        summary["uri"] = f"{manifests_root(root)}/{name}"
        out.append(summary)
    return sorted(out, key=lambda s: s.get("created_at", ""))


def run_summary(config, shards, index_stats: dict, budget_tokens: int, table: pa.Table,
                models: dict | None = None, tokenizer: dict | None = None, stages: dict | None = None) -> dict:
    """The ``manifest.json`` body (less what the writer adds) for a job's selection ``table``."""
    # Arrow aggregates, not Python lists: the selection can be millions of rows
    by_method = {c["values"]: c["counts"] for c in pc.value_counts(table["method"]).to_pylist()} \
        if table.num_rows else {}
    clustered = table.filter(pc.is_valid(table["cluster"])).group_by("cluster").aggregate(
        [("n_tokens", "count"), ("n_tokens", "sum")]).sort_by("cluster").to_pylist()
    by_cluster = {str(c["cluster"]): {"documents": c["n_tokens_count"], "tokens": c["n_tokens_sum"]}
                  for c in clustered}
    selected_tokens = int(pc.sum(table["n_tokens"]).as_py() or 0)
    return {
        "method": config.method,
        "config": config.redacted(),
        "config_hash": config.config_hash(),
        "seed": config.seed,
        "corpus": {
            "uri": config.corpus.uri,
            "shards": [{"uri": s.uri, "relpath": s.relpath, "size": s.size, "version": s.version} for s in shards],
            "documents": index_stats["documents"],
            "tokens": index_stats["tokens"],
            "rejected": index_stats["rejected"],
        },
        "models": models or {},
        "tokenizer": tokenizer or {"path": config.tokenizer},
        "budget": {"tokens": budget_tokens, "selected_tokens": selected_tokens,
                   "selected_documents": table.num_rows},
        "counts": {"by_method": dict(by_method), "by_cluster": by_cluster},
        "stages": stages or {},
    }
