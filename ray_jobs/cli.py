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

app = typer.Typer(help="Thresher: select LLM pretraining data (Quad, GTP, Rho-1) on Ray.", no_args_is_help=True,
                  add_completion=False, pretty_exceptions_enable=False)
manifest_app = typer.Typer(help="Inspect selection manifests.", no_args_is_help=True)
app.add_typer(manifest_app, name="manifest")
console = Console(stderr=False)


def _fail(exc: Exception) -> None:
    console.print(f"[bold red]error:[/] {exc}")
    raise typer.Exit(code=2)


@app.command()
def run(config: Path = typer.Argument(..., help="YAML job config (see README, 'Config reference')."),
        progress: bool = typer.Option(True, help="Show progress bars."),
        print_config: bool = typer.Option(False, "--print-config", help="Print the resolved config (secrets redacted) and exit.")):
    """Run a selection job and print where its committed manifest is."""
    from selector.config import dump_yaml, load_config
    from selector.errors import ThresherError

    try:
        cfg = load_config(config)
        if print_config:
            console.print(dump_yaml(cfg), markup=False)
            return
        from ray_jobs.select import run as run_job

        uri = run_job(cfg, progress=progress, log=console.print)
    except ThresherError as exc:
        _fail(exc)
    console.print(f"manifest: {uri}")


@manifest_app.command("show")
def manifest_show(uri: str = typer.Argument(..., help="Manifest URI (<root>/manifests/<run_id>)."),
                  rows: int = typer.Option(10, help="How many rows to print."),
                  storage_options: Optional[str] = typer.Option(None, help="fsspec options as JSON (for s3:// etc.).")):
    """Print a committed manifest's summary and its first rows."""
    from selector.errors import ThresherError
    from selector.manifest import read_manifest

    try:
        manifest = read_manifest(uri, json.loads(storage_options) if storage_options else None)
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
        table.add_row(*["" if r[c] is None else (f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]))
                        for c in columns])
    console.print(table)


@app.command()
def demo(out: Path = typer.Option(Path("demo-out"), help="Folder for the demo corpus, work dir and manifest."),
         budget_fraction: float = typer.Option(0.2, help="Fraction of the corpus's tokens to select."),
         seed: int = typer.Option(0, help="Selection seed."),
         progress: bool = typer.Option(True, help="Show progress bars.")):
    """Build a small real-text corpus from this Python install, run a selection on it, show the result."""
    from selector.config import parse_config
    from selector.demo_corpus import build_demo_corpus
    from selector.manifest import read_manifest

    import yaml

    started = time.time()
    out = out.resolve()
    console.print(f"[bold]1/3[/] building the demo corpus in {out} (CPython sources, docstrings, pydoc topics "
                  "+ synthetic low-quality documents)")
    built = build_demo_corpus(out)
    console.print(f"    {built['documents']:,} documents: " + ", ".join(f"{k} {v}" for k, v in built["sources"].items()))
    config = {
        "method": "random",
        "seed": seed,
        "tokenizer": built["tokenizer"],
        "corpus": {"uri": built["corpus"], "id_column": "id"},
        "work": {"root": str(out / "work")},
        "budget": {"fraction": budget_fraction},
        "ray": {"num_cpus": max(4, 2 * (os.cpu_count() or 1))},
    }
    config_path = out / "demo.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    console.print(f"[bold]2/3[/] running the job ({config_path})")
    from ray_jobs.select import run as run_job

    uri = run_job(parse_config(config, str(config_path)), progress=progress, log=lambda m: console.print("    " + m))
    console.print(f"[bold]3/3[/] the manifest ({time.time() - started:.0f} s in all)")
    manifest = read_manifest(uri)
    _print_manifest(manifest, rows=8)
    sources: dict[str, int] = {}
    for doc_id in manifest.table["doc_id"].to_pylist():
        src = doc_id.split("/", 1)[0]
        sources[src] = sources.get(src, 0) + 1
    console.print("selected by source: " + ", ".join(f"{k} {v}" for k, v in sorted(sources.items())))
    console.print(f"\nmanifest: {uri}\nre-run the job: thresher run {config_path}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
