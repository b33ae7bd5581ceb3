"""A lease in the work dir, so two refreshes of the same corpus never run at once.

The lease is one small JSON object at ``<root>/runs/_leases/<name>.json``::

    {"holder": ..., "host": ..., "pid": ..., "acquired_at": <epoch s>, "heartbeat_at": <epoch s>,
     "ttl": <s>, "nonce": <random, one per acquisition>}

* :meth:`Lease.acquire` writes it. While another holder's lease is fresh (its last heartbeat
  is younger than its ``ttl``) acquiring raises :class:`LeaseHeldError`, naming the holder and
  since when. A lease whose heartbeat is older than its ttl is *stale* (its holder died or
  hung) and is taken over, with a log line saying so.
* The holder calls :meth:`Lease.heartbeat` more often than the ttl (or
  :meth:`Lease.start_heartbeat` does it from a thread); a holder whose lease was taken over
  learns it there (:class:`LeaseLostError`) and must stop.
* :meth:`Lease.release` deletes it, and only its holder may.

How each store makes acquisition exclusive
------------------------------------------
* **Local disk**: the read-decide-write runs under an ``flock`` on ``<name>.json.lock``
  (released by the kernel if the process dies, so it never goes stale itself), and a new
  lease is created with ``O_CREAT|O_EXCL``, so even where ``flock`` is a no-op (some network
  file systems) two creators cannot both succeed.
* **S3** (s3fs): conditional PUTs. A new lease is written with ``If-None-Match: *`` and a
  stale one is replaced with ``If-Match: <etag of the stale object>``, so of two racers one
  gets ``412 Precondition Failed``. AWS S3 honours both; MinIO does too.
* **Every object store** (also S3-compatible stores that ignore those headers, GCS, ...):
  fsspec offers no compare-and-swap, so after writing, the acquirer waits
  ``confirm_delay_s`` and reads the lease back; only the writer whose record is still there
  holds it, the others raise :class:`LeaseHeldError`. The remaining race window: on a store
  *without* conditional writes, two acquirers that both read "free/stale" and whose writes
  land more than ``confirm_delay_s`` apart can both confirm. Heartbeats re-read the lease
  and compare the nonce, so the one overwritten learns it at its next heartbeat
  (:class:`LeaseLostError`); keep ``confirm_delay_s`` well above the store's write latency.
  Release on an object store reads, checks the nonce, then deletes: a takeover landing in
  between (only possible if the holder already let its lease go stale) would be deleted too.

Staleness compares the holder's wall clock (``heartbeat_at``) with the reader's: keep the
ttl far above the clock skew between machines (minutes, not seconds).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from typing import Any, Callable

from selector.errors import ThresherError
from selector.data.workdir import atomic_write_bytes, is_local, open_fs

log = logging.getLogger(__name__)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")


class LeaseError(ThresherError):
    """A lease cannot be acquired, renewed or released."""


class LeaseHeldError(LeaseError):
    """Another holder has a fresh lease (or would be released by someone who is not its holder)."""


class LeaseLostError(LeaseHeldError):
    """The lease this object held was taken over (it went stale) or removed: stop working."""


def leases_dir(root: str) -> str:
    return f"{root.rstrip('/')}/runs/_leases"


def _iso(ts: float | None) -> str:
    if ts is None:
        return "?"
    return _dt.datetime.fromtimestamp(ts, _dt.timezone.utc).isoformat(timespec="seconds")


def describe(record: dict, now: float | None = None) -> str:
    """``holder (host h, pid p) since <iso>, last heartbeat N s ago`` for messages."""
    now = time.time() if now is None else now
    age = now - float(record.get("heartbeat_at", 0))
    return (f"{record.get('holder')} (host {record.get('host')}, pid {record.get('pid')}) since "
            f"{_iso(record.get('acquired_at'))}, last heartbeat {age:.0f} s ago, ttl {record.get('ttl')} s")


def is_stale(record: dict, now: float | None = None) -> bool:
    now = time.time() if now is None else now
    return now - float(record.get("heartbeat_at", 0)) > float(record.get("ttl", 0))


class Lease:
    """An exclusive, expiring lease named ``name`` under ``<root>/runs/_leases/``.

    ``holder_id`` names this holder in messages (default ``<host>:<pid>:<random>``). A holder id
    that finds its own fresh lease takes it back (a retried job naming itself the same way
    need not wait for the ttl), so two live processes must never share one. ``ttl_s``: a lease not renewed for this long is stale.
    ``confirm_delay_s``: how long an object-store acquirer waits before reading its write back
    (default 1 s on object stores, 0 on local disk).
    """

    def __init__(self, root: str, name: str, holder_id: str | None = None, ttl_s: float = 900.0,
                 storage_options: dict | None = None, confirm_delay_s: float | None = None,
                 log_fn: Callable[[str], None] | None = None):
        if not _NAME.match(name or ""):
            raise LeaseError(f"lease name must be letters, digits, '.', '_' or '-' (not starting with one of "
                             f"the last three), at most 200 characters: {name!r}")
        if ttl_s <= 0:
            raise LeaseError(f"lease ttl must be positive, got {ttl_s}")
        self.root, self.name = root, name
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.holder = holder_id or f"{self.host}:{self.pid}:{uuid.uuid4().hex[:8]}"
        self.ttl = float(ttl_s)
        self.fs, root_path = open_fs(root, storage_options)
        self.dir = f"{root_path}/runs/_leases"
        self.path = f"{self.dir}/{name}.json"
        self.uri = f"{leases_dir(root)}/{name}.json"
        self.local = is_local(self.fs)
        self.conditional = type(self.fs).__name__ == "S3FileSystem"  # s3fs passes If-Match / If-None-Match
        self.confirm_delay = (0.0 if self.local else 1.0) if confirm_delay_s is None else float(confirm_delay_s)
        self._log = log_fn or log.warning
        self._nonce: str | None = None
        self._acquired_at: float | None = None
        self._etag: str | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.lost: LeaseLostError | None = None  # set by the heartbeat thread

    # -- public --------------------------------------------------------------------------
    @property
    def held(self) -> bool:
        return self._nonce is not None and self.lost is None

    def read(self) -> dict | None:
        """The lease record as stored now (None when nobody holds it)."""
        return self._read()[0]

    def acquire(self) -> "Lease":
        """Take the lease, or raise :class:`LeaseHeldError` naming who holds it and since when."""
        if self.held:
            return self
        nonce, now = uuid.uuid4().hex, time.time()
        self.pid = os.getpid()  # the process that acquires (a Lease object may cross a fork)
        record = self._record(nonce, acquired_at=now, now=now)
        if self.local:
            with self._flock():
                current, _ = self._read()
                if current is None:
                    self._create_exclusive_local(record)
                else:
                    self._refuse_if_fresh(current)
                    self._log_takeover(current)
                    atomic_write_bytes(self.fs, self.path, _dump(record))
        else:
            current, etag = self._read()
            if current is not None:
                self._refuse_if_fresh(current)
            self._put_object(record, create=current is None, etag=etag)
            if current is not None:
                self._log_takeover(current)
            self._confirm(nonce)
        self._nonce, self._acquired_at = nonce, now
        self.lost = None
        self._stop.clear()
        return self

    def heartbeat(self) -> None:
        """Renew the lease; raises :class:`LeaseLostError` if it is no longer ours."""
        if self._nonce is None:
            raise LeaseError(f"lease {self.uri} is not held by {self.holder}: acquire it first")
        record = self._record(self._nonce, acquired_at=self._acquired_at, now=time.time())
        if self.local:
            with self._flock():
                self._check_ours(self._read()[0])
                atomic_write_bytes(self.fs, self.path, _dump(record))
        else:
            current, etag = self._read()
            self._check_ours(current)
            self._put_object(record, create=False, etag=etag)

    def release(self) -> None:
        """Delete the lease. Only its holder may; anyone else gets :class:`LeaseHeldError`."""
        self.stop_heartbeat()
        if self.local:
            with self._flock():
                self._release_checked(self._read()[0])
        else:
            self._release_checked(self._read()[0])
        self._nonce = None

    def start_heartbeat(self, interval_s: float | None = None) -> None:
        """Renew from a daemon thread every ``interval_s`` (default ttl/3). A lost lease is kept
        in :attr:`lost` and re-raised by :meth:`check`."""
        if self._thread is not None:
            return
        interval = self.ttl / 3 if interval_s is None else interval_s
        self._stop.clear()

        def beat():
            while not self._stop.wait(interval):
                try:
                    self.heartbeat()
                except LeaseLostError as exc:
                    self.lost = exc
                    self._log(str(exc))
                    return
                except Exception as exc:  # a transient store error: retry at the next beat
                    self._log(f"lease {self.uri}: heartbeat failed, retrying: {exc}")

        self._thread = threading.Thread(target=beat, name=f"lease-{self.name}", daemon=True)
        self._thread.start()

    def stop_heartbeat(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def check(self) -> None:
        """Raise :class:`LeaseLostError` if the heartbeat thread found the lease taken over."""
        if self.lost is not None:
            raise self.lost

    def __enter__(self) -> "Lease":
        self.acquire()
        self.start_heartbeat()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop_heartbeat()
        if self.lost is None and self._nonce is not None:
            self.release()

    # -- internals -----------------------------------------------------------------------
    def _record(self, nonce: str, acquired_at: float | None, now: float) -> dict[str, Any]:
        return {"holder": self.holder, "host": self.host, "pid": self.pid, "acquired_at": acquired_at,
                "heartbeat_at": now, "ttl": self.ttl, "nonce": nonce}

    def _read(self) -> tuple[dict | None, str | None]:
        """``(record, etag)``; the etag is read *before* the body so a conditional write based on
        it can only fail, never overwrite a newer record than the one judged."""
        etag = None
        if not self.local:
            self.fs.invalidate_cache(self.path)
            try:
                etag = self.fs.info(self.path).get("ETag")
            except FileNotFoundError:
                return None, None
        try:
            data = self.fs.cat_file(self.path)
        except FileNotFoundError:
            return None, None
        if not data.strip():
            return None, etag  # only possible on a local fs where flock is a no-op, mid-create
        try:
            return json.loads(data), etag
        except json.JSONDecodeError as exc:
            raise LeaseError(f"lease {self.uri} is not valid JSON ({exc}); delete it if no refresh is "
                             "running") from None

    def _refuse_if_fresh(self, current: dict) -> None:
        now = time.time()
        if is_stale(current, now):
            return
        if current.get("holder") == self.holder:
            return  # our own lease, e.g. a retried job that reuses its holder id: take it back
        expires = float(current.get("heartbeat_at", 0)) + float(current.get("ttl", 0))
        raise LeaseHeldError(
            f"lease {self.name!r} is held by {describe(current, now)}: another refresh of this corpus is "
            f"running. Wait for it to finish; if its holder is dead the lease is taken over once stale "
            f"(after {_iso(expires)}). Lease: {self.uri}")

    def _log_takeover(self, current: dict) -> None:
        if current.get("holder") == self.holder and not is_stale(current):
            self._log(f"lease {self.name!r}: {self.holder} re-acquires its own lease ({describe(current)})")
            return
        self._log(f"lease {self.name!r}: taking over a stale lease from {describe(current)} "
                  f"(holder presumed dead); new holder {self.holder}")

    def _check_ours(self, current: dict | None) -> None:
        if current is None:
            raise LeaseLostError(f"lease {self.name!r} held by {self.holder} was removed ({self.uri}); stop work")
        if current.get("nonce") != self._nonce:
            raise LeaseLostError(f"lease {self.name!r} held by {self.holder} was taken over by "
                                 f"{describe(current)} ({self.uri}); stop work")

    def _release_checked(self, current: dict | None) -> None:
        if current is None:
            if self._nonce is not None:
                self._log(f"lease {self.name!r}: already gone at release ({self.uri})")
            return
        if current.get("nonce") != self._nonce or self._nonce is None:
            raise LeaseHeldError(f"cannot release lease {self.name!r} as {self.holder}: it is held by "
                                 f"{describe(current)}; only its holder may release it ({self.uri})")
        self.fs.rm_file(self.path)

    @contextlib.contextmanager
    def _flock(self):
        import fcntl

        os.makedirs(self.dir, exist_ok=True)
        fd = os.open(f"{self.path}.lock", os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing drops the flock

    def _create_exclusive_local(self, record: dict) -> None:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            current, _ = self._read()
            if current is not None:
                self._refuse_if_fresh(current)
            raise LeaseHeldError(f"lease {self.name!r} was created by another process at the same moment "
                                 f"({self.uri}); try again") from None
        with os.fdopen(fd, "wb") as f:
            f.write(_dump(record))
            f.flush()
            os.fsync(f.fileno())

    def _put_object(self, record: dict, create: bool, etag: str | None) -> None:
        data = _dump(record)
        if not self.conditional:
            self.fs.pipe_file(self.path, data)
            return
        try:
            if create:
                self.fs.pipe_file(self.path, data, mode="create")  # If-None-Match: *
            else:
                self.fs.pipe_file(self.path, data, IfMatch=etag)
        except (FileExistsError, FileNotFoundError, OSError) as exc:
            if isinstance(exc, OSError) and not isinstance(exc, (FileExistsError, FileNotFoundError)) \
                    and not _precondition_failed(exc):
                raise
            # someone else wrote (or removed) the lease between our read and our write
            current, _ = self._read()
            if self._nonce is not None:  # a heartbeat: the lease is no longer ours
                self._check_ours(current)
                raise LeaseLostError(f"lease {self.name!r} held by {self.holder} changed under it "
                                     f"({self.uri}); stop work") from None
            if current is not None:
                self._refuse_if_fresh(current)
            raise LeaseHeldError(f"lease {self.name!r} was taken by another process at the same moment "
                                 f"({self.uri}); try again") from None
        self.fs.invalidate_cache(self.path)

    def _confirm(self, nonce: str) -> None:
        """Read back after a delay: on a store without compare-and-swap the last writer wins."""
        if self.confirm_delay > 0:
            time.sleep(self.confirm_delay)
        current, _ = self._read()
        if current is None or current.get("nonce") != nonce:
            if current is None:
                raise LeaseHeldError(f"lease {self.name!r} vanished right after {self.holder} wrote it "
                                     f"({self.uri}); another process released or raced it: try again")
            raise LeaseHeldError(f"lease {self.name!r} is held by {describe(current)}: it won the race to "
                                 f"acquire it ({self.uri})")


def _precondition_failed(exc: BaseException) -> bool:
    cause = exc.__cause__
    code = getattr(cause, "response", {}).get("Error", {}).get("Code") if cause is not None else None
    return code == "PreconditionFailed" or (code is None and getattr(exc, "errno", None) == errno.EINVAL)


def _dump(record: dict) -> bytes:
    return json.dumps(record, sort_keys=True).encode()


def list_leases(root: str, storage_options: dict | None = None) -> list[dict]:
    """Every lease under ``<root>/runs/_leases`` with ``name``, ``stale`` and the record."""
    fs, root_path = open_fs(root, storage_options)
    directory = f"{root_path}/runs/_leases"
    if not fs.exists(directory):
        return []
    now, out = time.time(), []
    for path in sorted(fs.ls(directory, detail=False)):
        name = path.rsplit("/", 1)[-1]
        if not name.endswith(".json"):
            continue
        try:
            record = json.loads(fs.cat_file(path))
        except (FileNotFoundError, json.JSONDecodeError):
            continue  # released or being written at this moment
        out.append({"name": name[: -len(".json")], "stale": is_stale(record, now), **record})
    return out
