import json

import numpy as np
import pytest

from selector.errors import ManifestError
from selector.data.manifest import (MANIFEST_SCHEMA, ManifestWriter, list_manifests, pack_mask, read_manifest,
                               selection_table, unpack_mask)


def rows(n=5, masks=False):
    rng = np.random.default_rng(0)
    out = {
        "doc_id": [f"d{i}" for i in range(n)],
        "shard": ["s3://b/corpus/a.parquet"] * n,
        "row": list(range(n)),
        "n_tokens": [10 + i for i in range(n)],
        "cluster": [i % 2 for i in range(n)],
        "method": ["quad"] * n,
        "score": [float(i) / 3 for i in range(n)],
        "weight": [1.0] * n,
        "round": [i for i in range(n)],
    }
    if masks:
        out["token_mask"] = [pack_mask(rng.random(10 + i) > 0.4) for i in range(n)]
    return out


def roundtrip(root, storage_options=None):
    writer = ManifestWriter(root, "run-1", storage_options, rows_per_part=2)
    writer.write(selection_table(rows(5, masks=True)))
    uri = writer.commit({"method": "quad", "tokenizer": {"path": "/tok"}})
    manifest = read_manifest(uri, storage_options)
    assert len(manifest) == 5 and manifest.summary["n_documents"] == 5
    assert [p["rows"] for p in manifest.summary["parts"]] == [2, 2, 1]
    assert manifest.table.schema == MANIFEST_SCHEMA
    assert manifest.table["doc_id"].to_pylist() == [f"d{i}" for i in range(5)]
    assert manifest.selected_tokens == sum(10 + i for i in range(5))
    masks = list(manifest.token_masks())
    assert [len(m) for m in masks] == [10, 11, 12, 13, 14]
    assert manifest.summary["tokenizer"] == {"path": "/tok"}
    assert "torch" in manifest.summary["versions"]
    return uri


def test_roundtrip_on_local_disk(tmp_path):
    uri = roundtrip(str(tmp_path))
    assert uri == f"{tmp_path}/manifests/run-1"
    assert [m["run_id"] for m in list_manifests(str(tmp_path))] == ["run-1"]
    assert not list((tmp_path / "manifests" / "_staging").glob("*")), "staging is cleaned after commit"


def test_roundtrip_on_s3(s3_bucket):
    root = f"s3://{s3_bucket['bucket']}/thresher"
    uri = roundtrip(root, s3_bucket["storage_options"])
    assert uri == f"{root}/manifests/run-1"
    assert [m["run_id"] for m in list_manifests(root, s3_bucket["storage_options"])] == ["run-1"]


def test_uncommitted_manifest_is_refused(tmp_path):
    writer = ManifestWriter(str(tmp_path), "run-2")
    writer.write(selection_table(rows(3)))
    # staged, not committed: the final location has nothing, the staging dir is not readable as a manifest
    with pytest.raises(ManifestError, match="no manifest"):
        read_manifest(f"{tmp_path}/manifests/run-2")
    staged = next((tmp_path / "manifests" / "_staging").iterdir())
    with pytest.raises(ManifestError, match="not committed"):
        read_manifest(str(staged))
    assert list_manifests(str(tmp_path)) == []


def test_partial_manifest_is_refused(tmp_path):
    writer = ManifestWriter(str(tmp_path), "run-3", rows_per_part=2)
    writer.write(selection_table(rows(4)))
    uri = writer.commit({})
    (tmp_path / "manifests" / "run-3" / "part-00001.parquet").unlink()
    with pytest.raises(ManifestError, match="partial: part-00001.parquet is missing"):
        read_manifest(uri)


@pytest.mark.parametrize("head", [None, 1])  # the head reader checks every part's footer too
def test_part_with_wrong_row_count_is_refused(tmp_path, head):
    writer = ManifestWriter(str(tmp_path), "run-4")
    writer.write(selection_table(rows(4)))
    uri = writer.commit({})
    meta = tmp_path / "manifests" / "run-4" / "manifest.json"
    body = json.loads(meta.read_text())
    body["parts"][0]["rows"] = 99
    meta.write_text(json.dumps(body))
    with pytest.raises(ManifestError, match="has 4 rows, manifest.json says 99"):
        read_manifest(uri, head=head)


def test_committed_manifest_is_never_rewritten(tmp_path):
    writer = ManifestWriter(str(tmp_path), "run-5")
    writer.write(selection_table(rows(2)))
    writer.commit({})
    with pytest.raises(ManifestError, match="already committed"):
        ManifestWriter(str(tmp_path), "run-5")


def test_debris_of_a_crashed_commit_is_replaced(tmp_path):
    debris = tmp_path / "manifests" / "run-6"
    debris.mkdir(parents=True)
    (debris / "part-00000.parquet").write_bytes(b"half written")
    writer = ManifestWriter(str(tmp_path), "run-6")
    writer.write(selection_table(rows(2)))
    manifest = read_manifest(writer.commit({}))
    assert len(manifest) == 2


def test_selection_table_requires_core_columns_and_defaults_weight():
    r = rows(2)
    del r["weight"], r["cluster"]
    table = selection_table(r)
    assert table["weight"].to_pylist() == [1.0, 1.0] and table["cluster"].to_pylist() == [None, None]
    del r["doc_id"]
    with pytest.raises((ManifestError, KeyError)):
        selection_table(r)
    bad = rows(2)
    bad["score"] = [1.0]
    with pytest.raises(ManifestError, match="column 'score' has 1 values for 2"):
        selection_table(bad)


def test_mask_packing_roundtrip():
    rng = np.random.default_rng(1)
    for n in (1, 7, 8, 9, 1000):
        mask = rng.random(n) > 0.5
        assert np.array_equal(unpack_mask(pack_mask(mask), n), mask)


def test_extra_files_are_staged_and_committed_with_the_manifest(tmp_path):
    writer = ManifestWriter(str(tmp_path), "run-7")
    writer.write(selection_table(rows(2)))
    writer.write_extra("delta.parquet", b"delta bytes")
    final = tmp_path / "manifests" / "run-7"
    assert not final.exists(), "extras are staged, not written into the manifest before commit"
    for bad in ("part-00009.parquet", "manifest.json", "_SUCCESS", "a/b", ""):
        with pytest.raises(ManifestError, match="invalid extra file name"):
            writer.write_extra(bad, b"x")
    manifest = read_manifest(writer.commit({}))
    assert (final / "delta.parquet").read_bytes() == b"delta bytes"
    assert manifest.summary["extras"] == ["delta.parquet"] and len(manifest) == 2
    assert not list((tmp_path / "manifests" / "_staging").glob("*"))


@pytest.mark.parametrize("head", [0, 1, 3, 5, 50])
def test_head_reads_the_first_rows_and_checks_every_part(tmp_path, head):
    writer = ManifestWriter(str(tmp_path), "run-h", rows_per_part=2)
    writer.write(selection_table(rows(5)))
    uri = writer.commit({})
    whole = read_manifest(uri)
    part = read_manifest(uri, head=head)
    assert part.table.to_pylist() == whole.table.slice(0, head).to_pylist()
    assert part.summary == whole.summary
    (tmp_path / "manifests" / "run-h" / "part-00002.parquet").unlink()  # past the head: still checked
    with pytest.raises(ManifestError, match="part-00002.parquet is missing"):
        read_manifest(uri, head=head)

