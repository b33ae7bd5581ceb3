"""Reading a corpus: shard listing, bounded-memory batches, document ids, content hashes.

A corpus is a URI prefix (plain path, ``file://``, ``s3://``, ``gs://``: anything fsspec
opens) holding shards: Parquet (``.parquet``) or JSON Lines (``.jsonl``, ``.jsonl.gz``,
``.jsonl.zst``; ``.json`` too). Each document has

* ``doc_id``: the id column's value, or ``<shard path relative to prefix>:<row>``;
* ``content_hash``: BLAKE2b-128 of the UTF-8 text, so changed shards and duplicates are found;
* ``row``: its 0-based row in the shard, counting bad rows, so ids are stable.

Bad records (missing column, non-string or non-UTF-8 text, undecodable JSON, empty text,
a text longer than ``max_doc_chars``) and corrupt shards raise :class:`CorpusError` naming the
shard and row, or, with ``on_bad_record: quarantine``, go to a :class:`RejectSink` and are
counted; a record is never dropped silently.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import time
from dataclasses import dataclass, field
from typing import Iterator, Literal

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field, field_validator

from selector.config_base import StrictModel
from selector.errors import CorpusError
from selector.data.storage import storage_error
from selector.data.workdir import open_fs

PARQUET_SUFFIXES = (".parquet",)
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".json", ".json.gz", ".json.zst")


class CorpusConfig(StrictModel):
    """Where the corpus is and how to read it."""

    uri: str = Field(description="URI prefix holding the shards (path, file://, s3://, gs://).")
    format: Literal["auto", "parquet", "jsonl"] = Field("auto", description="Shard format; auto uses the suffix.")
    text_column: str = "text"
    id_column: str | None = Field(None, description="Column holding document ids; default <shard>:<row>.")
    storage_options: dict = Field(default_factory=dict,
                                  description="fsspec options (key, secret, endpoint_url, client_kwargs...).")
    batch_size: int = Field(256, ge=1, description="Documents per read batch (bounds memory).")
    on_bad_record: Literal["error", "quarantine"] = "error"
    max_doc_chars: int = Field(2_000_000, ge=1, description="Longer documents are bad records.")
    min_doc_chars: int = Field(1, ge=1, description="Shorter (e.g. empty) documents are bad records.")

    @field_validator("uri")
    @classmethod
    def _uri_not_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("corpus.uri is empty")
        return v


@dataclass(frozen=True)
class ShardInfo:
    """One shard: its full URI, path relative to the corpus prefix, size and version (etag or mtime)."""

    uri: str
    relpath: str
    size: int
    version: str
    format: str


@dataclass
class DocumentBatch:
    """A batch of good documents from one shard (parallel lists)."""

    shard: str  # relpath of the shard
    rows: list[int] = field(default_factory=list)
    doc_ids: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    content_hashes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.rows)

    def append(self, row: int, doc_id: str, text: str) -> None:
        self.rows.append(row)
        self.doc_ids.append(doc_id)
        self.texts.append(text)
        self.content_hashes.append(content_hash(text))


@dataclass(frozen=True)
class BadRecord:
    """A record (or a whole shard, ``row is None``) that could not be used, and why."""

    shard: str
    row: int | None
    field: str | None
    reason: str

    def message(self) -> str:
        where = f"shard {self.shard}" + (f", row {self.row}" if self.row is not None else "")
        what = f", field {self.field!r}" if self.field else ""
        return f"{where}{what}: {self.reason}"


class RejectSink:
    """Collects quarantined records; the caller persists them (e.g. as JSONL in the work dir)."""

    def __init__(self) -> None:
        self.records: list[BadRecord] = []

    def add(self, bad: BadRecord) -> None:
        self.records.append(bad)

    def __len__(self) -> int:
        return len(self.records)

    def to_jsonl(self) -> bytes:
        return "".join(json.dumps(bad.__dict__) + "\n" for bad in self.records).encode()


def content_hash(text: str) -> str:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()


def _shard_format(path: str, configured: str) -> str | None:
    if configured != "auto":
        return configured
    lower = path.lower()
    if lower.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if lower.endswith(JSONL_SUFFIXES):
        return "jsonl"
    return None


class Corpus:
    """Lists and reads the shards of a corpus per :class:`CorpusConfig`."""

    def __init__(self, config: CorpusConfig, label: str | None = None):
        self.config = config
        # the config section errors point at: "corpus", or "reference" for the reference set
        self.label = label or ("reference" if type(config).__name__ == "ReferenceConfig" else "corpus")
        self.fs, self.root = open_fs(config.uri, config.storage_options)
        self._protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]

    # -- listing -------------------------------------------------------------------------
    def list_shards(self) -> list[ShardInfo]:
        """Every shard under the prefix, sorted by relative path. Other files are ignored."""
        started = time.monotonic()
        try:
            if not self.fs.exists(self.root):
                raise CorpusError(f"{self.label} {self.config.uri!r} does not exist\n"
                                  f"  check: {self.label}.uri (a folder or prefix holding the shards)")
            if self.fs.isfile(self.root):
                entries = {self.root: self.fs.info(self.root)}
                base = self.root.rsplit("/", 1)[0]
            else:
                entries = self.fs.find(self.root, detail=True)
                base = self.root
        except CorpusError:
            raise
        except Exception as exc:
            self._raise_if_storage(exc, self.config.uri, self.label, started)
            raise
        shards = []
        for path, info in sorted(entries.items()):
            fmt = _shard_format(path, self.config.format)
            name = path.rsplit("/", 1)[-1]
            if fmt is None or name.startswith(("_", ".")):
                continue
            relpath = path[len(base):].lstrip("/")
            version = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified") or ""
            uri = path if self._protocol in ("file", "local") else f"{self._protocol}://{path}"
            shards.append(ShardInfo(uri=uri, relpath=relpath, size=int(info.get("size") or 0),
                                    version=str(version).strip('"'), format=fmt))
        if not shards:
            raise CorpusError(f"{self.label} {self.config.uri!r} holds no .parquet or .jsonl[.gz|.zst] shards "
                              f"({len(entries)} other files)\n"
                              f"  check: {self.label}.uri, and {self.label}.format if the shards have other suffixes")
        return shards

    def _raise_if_storage(self, exc: BaseException, uri: str, what: str, started: float | None = None) -> None:
        """Raise a :class:`StorageError` naming ``uri`` if ``exc`` is an object-store failure."""
        error = storage_error(exc, uri, what=what, setting=self.label, storage_options=self.config.storage_options,
                              elapsed=None if started is None else time.monotonic() - started)
        if error is not None:
            raise error from exc

    # -- reading -------------------------------------------------------------------------
    def iter_batches(self, shard: ShardInfo, rejects: RejectSink | None = None,
                     batch_size: int | None = None) -> Iterator[DocumentBatch]:
        """Good documents of ``shard`` in batches of at most ``batch_size``.

        Bad records raise :class:`CorpusError`, or go to ``rejects`` in quarantine mode.
        """
        size = batch_size or self.config.batch_size
        quarantine = self.config.on_bad_record == "quarantine"
        if quarantine and rejects is None:
            raise ValueError("on_bad_record='quarantine' needs a RejectSink")

        def bad(row: int | None, fld: str | None, reason: str) -> None:
            record = BadRecord(shard.relpath, row, fld, reason)
            if not quarantine:
                raise CorpusError(f"{record.message()}\n  check: {self._hint(record)}")
            rejects.add(record)

        reader = self._parquet_records if shard.format == "parquet" else self._jsonl_records
        batch = DocumentBatch(shard.relpath)
        records = 0
        try:
            for row, raw_text, raw_id, error in reader(shard):
                records += 1
                if error is not None:
                    bad(row, *error)
                    continue
                text = self._check_text(raw_text, row, bad)
                if text is None:
                    continue
                doc_id = f"{shard.relpath}:{row}" if self.config.id_column is None else raw_id
                if doc_id is None or (isinstance(doc_id, str) and not doc_id):
                    bad(row, self.config.id_column, "id is null or empty")
                    continue
                batch.append(row, str(doc_id), text)
                if len(batch) >= size:
                    yield batch
                    batch = DocumentBatch(shard.relpath)
        except _ShardUnreadable as exc:
            bad(exc.row, exc.field, exc.reason)
        else:
            if records == 0:
                bad(None, None, f"the shard holds no records ({shard.size} bytes): an interrupted write?")
        if len(batch):
            yield batch

    def _hint(self, record: BadRecord) -> str:
        """What to check for a bad record (the second line of its error)."""
        skip = f"or set {self.label}.on_bad_record: quarantine to skip and count such records"
        if "max_doc_chars" in record.reason:
            return f"raise {self.label}.max_doc_chars, {skip}"
        if "min_doc_chars" in record.reason or "text is empty" in record.reason:
            return f"lower {self.label}.min_doc_chars, {skip}"
        if record.reason.startswith(("missing column", "missing field")):
            return f"{self.label}.text_column / id_column (the shard's columns are listed above), {skip}"
        return f"the shard's content under {self.config.uri}, {skip}"

    def read_rows(self, shard: ShardInfo, rows: list[int]) -> DocumentBatch:
        """The documents at ``rows`` of ``shard`` (in the order given)."""
        wanted = set(rows)
        found: dict[int, tuple[str, str, str]] = {}
        sink = RejectSink()
        for batch in self.iter_batches(shard, rejects=sink):
            for row, doc_id, text in zip(batch.rows, batch.doc_ids, batch.texts):
                if row in wanted:
                    found[row] = (doc_id, text, "")
            if len(found) == len(wanted):
                break
        missing = wanted - set(found)
        if missing:
            raise CorpusError(f"shard {shard.relpath}: rows {sorted(missing)[:5]} not found or unreadable "
                              "(the shard changed since it was indexed?)")
        out = DocumentBatch(shard.relpath)
        for row in rows:
            out.append(row, found[row][0], found[row][1])
        return out

    def _check_text(self, value, row: int, bad) -> str | None:
        column = self.config.text_column
        if value is None:
            bad(row, column, "text is null")
            return None
        if isinstance(value, (bytes, bytearray)):
            try:
                value = bytes(value).decode("utf-8")
            except UnicodeDecodeError as exc:
                bad(row, column, f"text is not valid UTF-8 ({exc.reason} at byte {exc.start})")
                return None
        if not isinstance(value, str):
            bad(row, column, f"text is {type(value).__name__}, not a string")
            return None
        if len(value.strip()) < self.config.min_doc_chars:
            bad(row, column, "text is empty" if not value.strip() else
                f"text has {len(value.strip())} characters, fewer than min_doc_chars={self.config.min_doc_chars}")
            return None
        if len(value) > self.config.max_doc_chars:
            bad(row, column, f"text has {len(value)} characters, more than max_doc_chars={self.config.max_doc_chars}")
            return None
        return value

    # Each record reader yields (row, text, id, error) where error is (field, reason) or None.
    def _parquet_records(self, shard: ShardInfo):
        text_col, id_col = self.config.text_column, self.config.id_column
        started = time.monotonic()
        try:
            handle = self.fs.open(shard.uri if self._protocol in ("file", "local") else shard.uri, "rb")
            parquet = pq.ParquetFile(handle)
        except Exception as exc:  # pyarrow raises several types for a corrupt footer
            self._raise_if_storage(exc, shard.uri, "shard", started)
            raise _ShardUnreadable(None, None, f"cannot read Parquet: {exc}") from exc
        with handle:
            names = parquet.schema_arrow.names
            for col in [text_col] + ([id_col] if id_col else []):
                if col not in names:
                    raise _ShardUnreadable(None, col, f"missing column {col!r} (columns: {names})")
            columns = [text_col] + ([id_col] if id_col else [])
            row = 0
            try:
                for record_batch in parquet.iter_batches(batch_size=self.config.batch_size, columns=columns):
                    texts = _column_values(record_batch.column(0))
                    ids = record_batch.column(1).to_pylist() if id_col else [None] * len(texts)
                    for text, doc_id in zip(texts, ids):
                        yield row, text, doc_id, None
                        row += 1
            except (OSError, pa.ArrowException) as exc:
                self._raise_if_storage(exc, shard.uri, "shard")
                raise _ShardUnreadable(row, None, f"corrupt Parquet data after row {row}: {exc}") from exc

    def _jsonl_records(self, shard: ShardInfo):
        text_col, id_col = self.config.text_column, self.config.id_column
        row = 0
        try:
            with self.fs.open(shard.uri, "rb") as raw, _decompressed(raw, shard.relpath) as handle:
                for line in handle:
                    if not line.strip():
                        row += 1
                        yield row - 1, None, None, (None, "blank line, not a JSON object")
                        continue
                    try:
                        decoded = line.decode("utf-8")
                    except UnicodeDecodeError as exc:
                        yield row, None, None, (text_col, f"line is not valid UTF-8 ({exc.reason} at byte {exc.start})")
                        row += 1
                        continue
                    try:
                        record = json.loads(decoded)
                    except json.JSONDecodeError as exc:
                        yield row, None, None, (None, f"invalid JSON: {exc.msg} at column {exc.colno}")
                        row += 1
                        continue
                    if not isinstance(record, dict):
                        yield row, None, None, (None, f"JSON value is {type(record).__name__}, not an object")
                    elif text_col not in record:
                        yield row, None, None, (text_col, f"missing field {text_col!r}")
                    elif id_col and id_col not in record:
                        yield row, None, None, (id_col, f"missing field {id_col!r}")
                    else:
                        yield row, record[text_col], record.get(id_col) if id_col else None, None
                    row += 1
        except (OSError, EOFError, ValueError) as exc:
            self._raise_if_storage(exc, shard.uri, "shard")
            raise _ShardUnreadable(row, None, f"corrupt or truncated file after row {row}: {exc}") from exc
        except Exception as exc:  # zstandard raises its own ZstdError
            self._raise_if_storage(exc, shard.uri, "shard")
            if type(exc).__name__ == "ZstdError":
                raise _ShardUnreadable(row, None, f"corrupt zstd stream after row {row}: {exc}") from exc
            raise


@contextlib.contextmanager
def _decompressed(raw, name: str):
    """A line-iterable binary stream over ``raw``, gunzipped / un-zstd'ed by suffix."""
    lower = name.lower()
    if lower.endswith(".gz"):
        with gzip.GzipFile(fileobj=raw) as stream:
            yield stream
    elif lower.endswith(".zst"):
        import zstandard

        with zstandard.ZstdDecompressor().stream_reader(raw) as reader:
            yield io.BufferedReader(reader)
    else:
        yield raw


class _ShardUnreadable(Exception):
    def __init__(self, row: int | None, fld: str | None, reason: str):
        super().__init__(reason)
        self.row, self.field, self.reason = row, fld, reason


def _column_values(column: pa.Array) -> list:
    """Python values of a text column; binary values stay bytes so UTF-8 is checked per row."""
    if pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type):
        return [v.as_py() for v in column]
    return column.to_pylist()


class TokenCounter:
    """Counts tokens with the trainer's HF tokenizer (no special tokens), loaded from a path."""

    def __init__(self, tokenizer_path: str):
        from selector.models.loading import load_tokenizer

        self.path = tokenizer_path
        self.tokenizer = load_tokenizer(tokenizer_path)
        # Counting is not model input: silence the "longer than model_max_length" warning.
        self.tokenizer.model_max_length = 1 << 62

    def count(self, texts: list[str]) -> list[int]:
        if not texts:
            return []
        encoded = self.tokenizer(texts, add_special_tokens=False, return_attention_mask=False,
                                 return_token_type_ids=False)
        return [len(ids) for ids in encoded["input_ids"]]
