"""The HTML report: five inline figures and their headings, from a real committed manifest."""

from __future__ import annotations

import base64
from html.parser import HTMLParser

import numpy as np
import pytest

from selector.errors import ManifestError
from selector.data.manifest import ManifestWriter, selection_table
from selector.quad.loop import QuadConfig, QuadSelector
from selector.data.report import SECTIONS, report_command, write_report


class _Page(HTMLParser):
    """Collects h1/h2 texts, img sources and paragraph texts."""

    def __init__(self):
        super().__init__()
        self.headings: dict[str, list[str]] = {"h1": [], "h2": []}
        self.images: list[dict] = []
        self.notes: list[str] = []
        self.external: list[str] = []
        self._in: str | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag in ("h1", "h2", "p"):
            self._in = tag
        if tag == "img":
            self.images.append(attrs)
        for key in ("src", "href"):
            if key in attrs and not attrs[key].startswith(("data:", "#")):
                self.external.append(attrs[key])

    def handle_endtag(self, tag):
        if tag == self._in:
            self._in = None

    def handle_data(self, data):
        if self._in in ("h1", "h2"):
            self.headings[self._in].append(data.strip())
        elif self._in == "p":
            self.notes.append(data.strip())


def _parse(path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


def _quad_run():
    rng = np.random.default_rng(0)
    ids = [f"shard-{i % 3}.parquet:{i}" for i in range(600)]
    clusters = rng.integers(0, 10, 600)
    tokens = rng.integers(20, 200, 600)
    means = np.linspace(-1, 1, 10)
    cfg = QuadConfig(arms_per_round=3, block_size=10, sample_ratio=0.3, warmup_size=60)
    q = QuadSelector(cfg, ids, clusters, tokens, int(tokens.sum() * 0.2), seed=0)
    while (plan := q.plan_round()) is not None:
        q.apply_round([[(means[it.cluster] + rng.normal()) * 1e-3 for _ in it.sample] for it in plan.items])
    return q


def _write_manifest(root, run_id, rows, summary):
    writer = ManifestWriter(str(root), run_id)
    writer.write(selection_table(rows))
    return writer.commit(summary)


def test_report_of_a_quad_manifest_has_five_inline_figures(tmp_path):
    q = _quad_run()
    sel = q.selection()
    n = len(sel["doc_id"])
    rows = dict(sel, shard=[f"file:///corpus/{d.split(':')[0]}" for d in sel["doc_id"]],
                row=[int(d.split(":")[1]) for d in sel["doc_id"]], method=["quad"] * n)
    summary = {"method": "quad", "budget": {"tokens": q.budget}, "quad": q.summary()}
    uri = _write_manifest(tmp_path, "quad-report", rows, summary)
    out = tmp_path / "out" / "report.html"
    assert write_report(uri, str(out)) == str(out)
    page = _parse(out)
    assert page.headings["h2"] == [h for _, h in SECTIONS]
    assert "quad-report" in page.headings["h1"][0]
    assert len(page.images) == 5 and not page.external
    for img in page.images:
        head, _, data = img["src"].partition(",")
        assert head == "data:image/png;base64"
        assert base64.b64decode(data)[:8] == b"\x89PNG\r\n\x1a\n"
    assert [img["alt"] for img in page.images] == [h for _, h in SECTIONS]
    text = out.read_text()
    assert f"{q.used_tokens:,}" in text and q.stop_reason in text


def test_report_without_a_round_log_still_has_every_heading(tmp_path):
    rows = {"doc_id": ["a", "b", "c"], "shard": ["s"] * 3, "row": [0, 1, 2], "n_tokens": [5, 6, 7],
            "method": ["random"] * 3}
    uri = _write_manifest(tmp_path, "random-report", rows, {"method": "random", "budget": {"tokens": 20}})
    out = tmp_path / "random.html"
    write_report(uri, str(out))
    page = _parse(out)
    assert page.headings["h2"] == [h for _, h in SECTIONS]
    assert page.images == []
    assert sum("No Quad round log" in n for n in page.notes) == 4
    assert sum("No cluster assignments" in n for n in page.notes) == 1

    # rows with clusters but no round log: the per-cluster figure comes from the rows;
    # a round log passed in explicitly fills the rest
    q = _quad_run()
    sel = q.selection()
    n = len(sel["doc_id"])
    rows = dict(sel, shard=["s"] * n, row=list(range(n)), method=["quad"] * n)
    uri = _write_manifest(tmp_path, "quad-nolog", rows, {"method": "quad", "budget": {"tokens": q.budget}})
    write_report(uri, str(tmp_path / "nolog.html"))
    assert len(_parse(tmp_path / "nolog.html").images) == 1
    line = report_command(uri, str(tmp_path / "withlog.html"))
    assert line.endswith("withlog.html") and len(_parse(tmp_path / "withlog.html").images) == 1
    write_report(uri, str(tmp_path / "given.html"), history=q.summary()["history"])
    assert len(_parse(tmp_path / "given.html").images) == 5


def test_report_refuses_an_uncommitted_manifest(tmp_path):
    with pytest.raises(ManifestError):
        write_report(str(tmp_path / "manifests" / "nothing"), str(tmp_path / "x.html"))
