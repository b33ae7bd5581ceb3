"""selector.data.storage: the retry plan fits its budget, and storage errors name the object (real botocore
exception types; the end-to-end cases, on the S3-protocol server, are in test_errors.py / test_faults.py)."""

from __future__ import annotations

import pytest
from botocore.exceptions import EndpointConnectionError

from selector.data.storage import _backoff, open_filesystem, read_timeout, request_uri, retry_plan, storage_error


@pytest.mark.parametrize("seconds", [1, 3, 30, 120])
def test_retry_plan_fits_the_budget(seconds):
    attempts, timeout = retry_plan(seconds)
    spent = sum(_backoff(i) + timeout for i in range(attempts))
    assert attempts >= 1 and (spent <= seconds or attempts == 1)
    # one more attempt would not fit
    assert spent + _backoff(attempts) + timeout > seconds


@pytest.mark.parametrize("seconds, expected", [(3, 5.0), (30, 5.0), (120, 120 / retry_plan(120)[0])])
def test_read_timeout_bounds_a_stalled_store(seconds, expected, monkeypatch):
    """A request on a connection the store never answers waits read_timeout per attempt (botocore's
    default, 60 s, let a stall outlast a 3 s budget many times over)."""
    assert read_timeout(seconds) == pytest.approx(expected)
    monkeypatch.setenv("THRESHER_STORAGE_RETRY_SECONDS", "3")
    fs, _ = open_filesystem("s3://bucket/key", {"client_kwargs": {"endpoint_url": "http://127.0.0.1:1"}})
    assert fs.config_kwargs["read_timeout"] == 5.0 and fs.config_kwargs["connect_timeout"] == 1.0
    fs, _ = open_filesystem("s3://bucket/key", {"config_kwargs": {"read_timeout": 90}})
    assert fs.config_kwargs["read_timeout"] == 90  # set explicitly: kept


@pytest.mark.parametrize("url, uri", [
    ("http://127.0.0.1:9000/bucket/runs/x/index/part-01.jsonl.done.json", "s3://bucket/runs/x/index/part-01.jsonl.done.json"),
    ("https://my-bucket.s3.us-east-1.amazonaws.com/a/b%20c.json", "s3://my-bucket/a/b c.json"),
    ("https://my-bucket.s3.amazonaws.com/", "s3://my-bucket"),
])
def test_request_uri_reads_the_object_from_the_endpoint_url(url, uri):
    assert request_uri(EndpointConnectionError(endpoint_url=url)) == uri


def test_an_error_without_a_known_uri_names_the_failed_request():
    try:
        try:
            raise EndpointConnectionError(endpoint_url="http://127.0.0.1:1/data/corpus/part-7.parquet")
        except EndpointConnectionError as inner:
            raise OSError("listing failed") from inner
    except OSError as exc:
        error = storage_error(exc, "", what="the object", storage_options={"endpoint_url": "http://127.0.0.1:1"})
    assert error.kind == "unreachable"
    first = str(error).splitlines()[0]
    assert "s3://data/corpus/part-7.parquet" in first and "http://127.0.0.1:1" in first
    assert request_uri(ValueError("no url here")) is None
    assert storage_error(ValueError("not storage"), "s3://x/y") is None
