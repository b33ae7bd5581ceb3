"""What has run under a root: committed manifests and runs still in progress (or dead).

``list_runs`` joins two listings of ``<root>``:

* ``manifests/<run_id>/`` with ``_SUCCESS``: **committed** (summary from ``manifest.json``);
* ``runs/<run_id>/`` (the work dir) or ``manifests/<run_id>/`` without ``_SUCCESS`` and no
  committed manifest: **incomplete** — the job is running, or died, or never committed.

Names starting with ``_`` (``manifests/_staging``, ``runs/_leases``) are bookkeeping, not runs.
Listing reads one ``manifest.json`` per committed run and lists each incomplete run's stage
folders once (for counts and dates); it never reads a manifest's parts. ``show_run`` is the
detailed view of one run. Backs ``thresher runs list|show``.
"""

from __future__ import annotations

import datetime as _dt
import json
from typing import Any

from selector.errors import ManifestError
from selector.data.manifest import MANIFEST_JSON, SUCCESS, list_manifests, manifest_uri
from selector.data.workdir import open_fs


def _iso(value: Any) -> str | None:
    """A listing's modification time (epoch float on local disk, datetime on S3) as ISO UTC."""
    if value is None:
        return None
    if isinstance(value, (int, float)):
        value = _dt.datetime.fromtimestamp(value, _dt.timezone.utc)
    if isinstance(value, _dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=_dt.timezone.utc)
        return value.astimezone(_dt.timezone.utc).isoformat(timespec="seconds")
    return str(value)


def _mtime(entry: dict) -> str | None:
    return _iso(entry.get("mtime", entry.get("LastModified", entry.get("updated"))))


def _names(fs, path: str) -> list[str]:
    if not fs.exists(path):
        return []
    return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))


def _workdir_summary(fs, run_path: str) -> dict[str, Any]:
    """Per stage: finished shards (``.done.json`` markers) and the first/last write times."""
    stages: dict[str, dict[str, Any]] = {}
    times: list[str] = []
    for entry in fs.ls(run_path, detail=True):
        stage = entry["name"].rstrip("/").rsplit("/", 1)[-1]
        if entry.get("type") != "directory":
            continue
        files = [e for e in fs.ls(entry["name"], detail=True) if e.get("type") != "directory"]
        done = [e for e in files if e["name"].endswith(".done.json")]
        stamps = sorted(t for t in (_mtime(e) for e in files) if t)
        stages[stage] = {"files": len(files), "done": len(done),
                         "first_write": stamps[0] if stamps else None, "last_write": stamps[-1] if stamps else None}
        times += stamps
    times.sort()
    return {"stages": stages, "started_at": times[0] if times else None, "updated_at": times[-1] if times else None}


def _committed_entry(summary: dict) -> dict[str, Any]:
    budget, corpus = summary.get("budget", {}), summary.get("corpus", {})
    return {
        "run_id": summary["run_id"],
        "status": "committed",
        "method": summary.get("method"),
        "created_at": summary.get("created_at"),
        "config_hash": summary.get("config_hash"),
        "documents": summary.get("n_documents"),
        "selected_tokens": budget.get("selected_tokens"),
        "budget_tokens": budget.get("tokens"),
        "corpus_documents": corpus.get("documents"),
        "corpus_tokens": corpus.get("tokens"),
        "shards": len(corpus.get("shards", [])),
        "uri": summary["uri"],
    }


def list_runs(root: str, storage_options: dict | None = None) -> list[dict[str, Any]]:
    """Every run under ``root``: committed ones (with counts) and incomplete ones, oldest first.

    Each entry has ``run_id``, ``status`` (``committed``/``incomplete``), ``method``,
    ``created_at`` (commit time; for an incomplete run its first write), ``config_hash``,
    ``documents``, ``selected_tokens``, ``budget_tokens``, ``shards`` and ``uri``; an incomplete
    run also has ``updated_at`` (its last write) and ``stages`` (finished shards per stage).
    """
    fs, root_path = open_fs(root, storage_options)
    out = [_committed_entry(s) for s in list_manifests(root, storage_options)]
    committed = {e["run_id"] for e in out}
    base = root.rstrip("/")
    candidates = {n: "work" for n in _names(fs, f"{root_path}/runs") if not n.startswith("_")}
    for name in _names(fs, f"{root_path}/manifests"):
        if not name.startswith("_") and name not in committed:
            candidates.setdefault(name, "manifest")  # a commit that died before _SUCCESS
    for run_id, where in sorted(candidates.items()):
        if run_id in committed:
            continue
        work = _workdir_summary(fs, f"{root_path}/runs/{run_id}") if where == "work" else \
            {"stages": {}, "started_at": None, "updated_at": None}
        index = work["stages"].get("index", {})
        out.append({
            "run_id": run_id,
            "status": "incomplete",
            "method": _method_from_run_id(run_id),
            "created_at": work["started_at"],
            "updated_at": work["updated_at"],
            "config_hash": None,
            "documents": None,
            "selected_tokens": None,
            "budget_tokens": None,
            "shards": index.get("done"),
            "stages": {k: v["done"] for k, v in work["stages"].items()},
            "uri": f"{base}/runs/{run_id}" if where == "work" else manifest_uri(root, run_id),
        })
    return sorted(out, key=lambda e: (e["created_at"] or "", e["run_id"]))


def _method_from_run_id(run_id: str) -> str | None:
    """Default run ids are ``<method>-<config hash>``; a custom run id tells nothing."""
    from selector.config import METHODS

    head = run_id.rsplit("-", 1)[0]
    return head if head in METHODS else None


def show_run(root: str, run_id: str, storage_options: dict | None = None) -> dict[str, Any]:
    """One run's summary: status, method, config hash, counts, budget, dates, corpus shards and,
    where its work dir still exists, finished shards per stage. Raises :class:`ManifestError`
    if ``root`` has neither a manifest nor a work dir for ``run_id``."""
    if not run_id or "/" in run_id:
        raise ManifestError(f"run id must be a non-empty name without '/': {run_id!r}")
    fs, root_path = open_fs(root, storage_options)
    mpath, wpath = f"{root_path}/manifests/{run_id}", f"{root_path}/runs/{run_id}"
    has_work = fs.exists(wpath)
    out: dict[str, Any] = {"run_id": run_id, "manifest_uri": manifest_uri(root, run_id),
                           "work_uri": f"{root.rstrip('/')}/runs/{run_id}" if has_work else None}
    if fs.exists(f"{mpath}/{SUCCESS}"):
        try:
            with fs.open(f"{mpath}/{MANIFEST_JSON}", "rb") as f:
                summary = json.loads(f.read())
        except FileNotFoundError:
            raise ManifestError(f"manifest {manifest_uri(root, run_id)} has {SUCCESS} but no {MANIFEST_JSON}: "
                                "partial manifest") from None
        corpus, budget = summary.get("corpus", {}), summary.get("budget", {})
        out.update({
            "status": "committed",
            "method": summary.get("method"),
            "config_hash": summary.get("config_hash"),
            "seed": summary.get("seed"),
            "created_at": summary.get("created_at"),
            "documents": summary.get("n_documents"),
            "parts": len(summary.get("parts", [])),
            "budget": budget,
            "corpus": {"uri": corpus.get("uri"), "shards": len(corpus.get("shards", [])),
                       "documents": corpus.get("documents"), "tokens": corpus.get("tokens"),
                       "rejected": corpus.get("rejected")},
            "shards": [s.get("uri") for s in corpus.get("shards", [])],
            "counts": {"by_method": summary.get("counts", {}).get("by_method", {}),
                       "clusters": len(summary.get("counts", {}).get("by_cluster", {}))},
            "tokenizer": summary.get("tokenizer"),
            "versions": summary.get("versions", {}),
        })
    elif has_work or fs.exists(mpath):
        out.update({"status": "incomplete", "method": _method_from_run_id(run_id), "config_hash": None})
    else:
        raise ManifestError(f"no run {run_id!r} under {root}: neither {manifest_uri(root, run_id)} nor "
                            f"{root.rstrip('/')}/runs/{run_id} exists")
    if has_work:
        work = _workdir_summary(fs, wpath)
        out["stages"] = work["stages"]
        out["started_at"], out["updated_at"] = work["started_at"], work["updated_at"]
        if out["status"] == "incomplete":
            out["created_at"] = work["started_at"]
            out["stage_config_hashes"] = _marker_hashes(fs, wpath, work["stages"])
    return out


def _marker_hashes(fs, run_path: str, stages: dict) -> dict[str, str | None]:
    """The config hashes recorded by each stage's first done marker (reads one file per stage)."""
    out = {}
    for stage, info in stages.items():
        if not info["done"]:
            continue
        marker = next(p for p in sorted(fs.ls(f"{run_path}/{stage}", detail=False)) if p.endswith(".done.json"))
        with fs.open(marker, "rb") as f:
            out[stage] = json.loads(f.read()).get("config_hash")
    return out
