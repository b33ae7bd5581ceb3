"""The nightly corpus refresh: config, lineage, change detection, drift and the selection delta.

Pure functions (no Ray) used by :mod:`ray_jobs.refresh`; docs/refresh.md is the operator's view.

Config. A refresh config is a job config (:mod:`selector.config`, any method) with an optional
top-level ``refresh:`` section (:class:`RefreshConfig`); :func:`split_refresh_config` pops that
section and validates the rest with :func:`selector.config.parse_config`, so a plain job config
is also a valid refresh config (the defaults apply).

Lineage. Every refresh of the same job config (same :meth:`JobConfig.config_hash`) shares one
work dir, ``runs/<method>-lineage-<config hash[:12]>/``: per-shard index, embedding and
cluster-assignment outputs, the centroids, the K-FAC factors and query. Their done markers
carry the shard's size and version (etag/mtime), so an unchanged shard is never re-indexed or
re-embedded and a changed one is. Each refresh commits its own dated manifest,
``manifests/<method>-refresh-<YYYYMMDDTHHMMSSZ>/`` (``<run_id>-refresh-...`` when the config
names a ``run_id``); the *previous* run is the newest committed manifest of the same lineage.

Change detection. ``manifest.json["refresh"]["shards"]`` records per shard its size, version,
document count and *digest* (SHA-256 over the index's ``doc_id, row, content_hash`` rows).
Against the previous run a current shard is

* ``added``: its path is new; ``removed``: its path is gone;
* ``unchanged``: same size and version (its digest is carried, not recomputed);
* ``touched``: size or version differ but the digest is equal (re-uploaded / re-written with
  the same content, e.g. a new mtime): treated as unchanged, its embeddings are kept;
* ``changed``: the digest differs: all its documents count as removed and re-added.

Document counts follow the shards: added = documents of added + changed shards (as they are
now), removed = documents of removed + changed shards (as they were), unchanged = the rest.

Drift (when to re-cluster). The centroids of the last fit are kept and new shards are assigned
to them. Drift is ``mean cosine distance of the newly assigned documents to their centroid /
mean cosine distance of all documents right after the fit`` (:func:`drift_ratio`); when it is
above ``drift_threshold`` (default 1.25: new documents sit 25% further from the centroids than
the fitted ones did) the refresh refits k-means on all current embeddings and reassigns every
shard. New documents that fit the existing clusters keep the ratio near 1; a new domain pushes
it up. A refresh that adds no documents never refits.

Bandit carry-forward (quad). When the centroids were kept, the new bandit starts from the
previous run's final arm statistics (``manifest.json["refresh"]["bandit"]``) for clusters that
still have documents, multiplied by ``bandit_decay`` (default 0.5): the means are kept and
their confidence halves each night (:meth:`selector.quad.bandit.UCBBandit.carry_forward`). After a
refit cluster ids are new, so nothing is carried.

Delta. ``manifests/<run_id>/delta.parquet`` has one row per document whose selection changed:
``doc_id``, ``change`` (``added`` | ``removed``), against the previous run's selection (all
``added`` for the first run of a lineage).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
from pydantic import Field, ValidationError

from selector.config import JobConfig, parse_config
from selector.config_base import StrictModel
from selector.errors import ConfigError
from selector.data.workdir import stable_hash

DELTA_FILE = "delta.parquet"
DELTA_SCHEMA = pa.schema([pa.field("doc_id", pa.string(), nullable=False),
                          pa.field("change", pa.string(), nullable=False)])


class RefreshConfig(StrictModel):
    """The ``refresh:`` section of a refresh config (all optional)."""

    name: str | None = Field(None, description="Lease name (one refresh per name at a time); default "
                             "refresh-<hash of corpus.uri>, i.e. one per corpus.")
    lease_ttl_s: float = Field(900.0, gt=0, description="A lease not renewed for this long is stale and is "
                               "taken over; the holder renews every ttl/3.")
    drift_threshold: float = Field(1.25, gt=0, description="Refit k-means when the new documents' mean "
                                   "distance to their centroids exceeds this multiple of the fit-time mean.")
    bandit_decay: float = Field(0.5, ge=0, le=1, description="Carried bandit statistics (pulls, reward "
                                "weights) are multiplied by this; 0 carries nothing.")


def split_refresh_config(data: Any, source: str = "<dict>") -> tuple[RefreshConfig, JobConfig]:
    """``(refresh section, job config)`` from a parsed YAML mapping."""
    if not isinstance(data, dict):
        raise ConfigError(f"invalid config {source}: expected a mapping at the top level, got {type(data).__name__}")
    data = dict(data)
    section = data.pop("refresh", None) or {}
    try:
        refresh = RefreshConfig.model_validate(section)
    except ValidationError as exc:
        lines = [f"invalid config {source}:"]
        for err in exc.errors():
            path = ".".join(["refresh", *(str(p) for p in err["loc"])])
            lines.append(f"  {path}: {'unknown key' if err['type'] == 'extra_forbidden' else err['msg']}")
        raise ConfigError("\n".join(lines)) from None
    return refresh, parse_config(data, source)


def load_refresh_config(path: str | Path) -> tuple[RefreshConfig, JobConfig]:
    """A refresh config file: its ``refresh:`` section and the job config around it."""
    from selector.config import read_yaml

    return split_refresh_config(read_yaml(path), str(path))


def lineage_id(config: JobConfig) -> str:
    """The work-dir run id every refresh of this job config shares."""
    return f"{config.method}-lineage-{config.config_hash()[:12]}"


def default_lease_name(config: JobConfig) -> str:
    return f"refresh-{stable_hash(config.corpus.uri.rstrip('/'))[:12]}"


def dated_run_id(config: JobConfig, now: _dt.datetime | None = None) -> str:
    now = now or _dt.datetime.now(_dt.timezone.utc)
    return f"{config.run_id or config.method}-refresh-{now.strftime('%Y%m%dT%H%M%SZ')}"


def shard_digest(index_table: pa.Table) -> str:
    """SHA-256 over a shard's index rows (doc_id, row, content_hash), in row order."""
    h = hashlib.sha256()
    for doc_id, row, content in zip(index_table["doc_id"].to_pylist(), index_table["row"].to_pylist(),
                                    index_table["content_hash"].to_pylist()):
        h.update(f"{doc_id}\x00{row}\x00{content}\n".encode())
    return h.hexdigest()


@dataclass
class ShardChanges:
    """How the current shards differ from the previous run's (relpaths; see the module docstring)."""

    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    touched: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)

    @property
    def any_change(self) -> bool:
        """Whether the documents differ (touched shards hold the same documents)."""
        return bool(self.added or self.removed or self.changed)

    def counts(self) -> dict[str, int]:
        return {"added": len(self.added), "removed": len(self.removed), "changed": len(self.changed),
                "touched": len(self.touched), "unchanged": len(self.unchanged) + len(self.touched)}


def same_listing(current: dict, previous: dict | None) -> bool:
    return previous is not None and int(previous["size"]) == int(current["size"]) and \
        str(previous["version"]) == str(current["version"])


def classify_shards(current: dict[str, dict], previous: dict[str, dict]) -> ShardChanges:
    """Compare ``{relpath: {size, version, digest}}`` snapshots (current digests must be set)."""
    out = ShardChanges()
    for relpath in sorted(current):
        now, before = current[relpath], previous.get(relpath)
        if before is None:
            out.added.append(relpath)
        elif same_listing(now, before):
            out.unchanged.append(relpath)
        elif now["digest"] == before.get("digest"):
            out.touched.append(relpath)
        else:
            out.changed.append(relpath)
    out.removed = sorted(set(previous) - set(current))
    return out


def document_counts(changes: ShardChanges, current: dict[str, dict], previous: dict[str, dict]) -> dict[str, int]:
    """Documents added / removed / unchanged, by shard (a changed shard's documents are replaced)."""
    docs = lambda snap, paths: sum(int(snap[p]["documents"]) for p in paths)  # noqa: E731
    return {"added": docs(current, changes.added + changes.changed),
            "removed": docs(previous, changes.removed + changes.changed),
            "unchanged": docs(current, changes.unchanged + changes.touched)}


def drift_ratio(new_mean_distance: float | None, fit_mean_distance: float) -> float | None:
    """New documents' mean centroid distance over the fit-time mean; None without new documents."""
    if new_mean_distance is None:
        return None
    if fit_mean_distance <= 0:  # every fitted document sat on its centroid: any spread is drift
        return float("inf") if new_mean_distance > 0 else 1.0
    return float(new_mean_distance) / float(fit_mean_distance)


def selection_delta(previous_ids: list[str], current_ids: list[str]) -> pa.Table:
    """``doc_id, change`` rows: ``added`` (selected now, not before), then ``removed``, each sorted."""
    before, now = set(previous_ids), set(current_ids)
    added, removed = sorted(now - before), sorted(before - now)
    return pa.table({"doc_id": added + removed, "change": ["added"] * len(added) + ["removed"] * len(removed)},
                    schema=DELTA_SCHEMA)


def previous_run(manifests: list[dict], lineage: str) -> dict | None:
    """The newest committed manifest summary of ``lineage`` (``list_manifests`` output, oldest first)."""
    mine = [m for m in manifests if (m.get("refresh") or {}).get("lineage") == lineage]
    return mine[-1] if mine else None


def carried_bandit(bandit_state: dict | None) -> dict | None:
    """The part of a bandit state a later refresh needs (arms and their statistics)."""
    if not bandit_state:
        return None
    return {k: bandit_state[k] for k in ("arms", "pulls", "weight", "weighted_sum", "total_pulls")}
