"""How a command that failed tells a person why: one short paragraph on stderr and exit code 2.

* Ray's wrappers are taken off: a :class:`ray.exceptions.RayTaskError` is replaced by its
  ``cause``; an actor that died in ``__init__`` (:class:`ray.exceptions.ActorDiedError`, which
  keeps only the text of its cause) is replaced by the Thresher error named at the end of that
  text. No traceback, pid, ip or actor id reaches the message.
* A :class:`selector.errors.ThresherError` (bad config, bad data, missing model, storage that
  cannot be reached or denies access, ...) is the user's to fix: its message, at most
  :data:`MAX_LINES` lines, exit code 2. Storage errors raised without a Thresher wrapper are
  explained by :func:`selector.data.storage.storage_error`.
* Anything else is unexpected (a bug, or the machine): its type and first line, exit code 1.
* ``--debug`` or ``THRESHER_DEBUG=1`` prints the full traceback (with Ray's remote part) first.

While not debugging, Ray's "Unhandled error" reports (the tracebacks of failed tasks whose
results nobody fetched, printed when the driver exits) are switched off with
``RAY_IGNORE_UNHANDLED_ERRORS=1``, and the tracebacks workers print to their stderr (which Ray
forwards to the driver: an actor whose ``__init__`` raised prints ~40 lines) are cut from the
forwarded output (:func:`quiet_worker_tracebacks`): the error that stopped the job is reported
once, here.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import traceback

from selector.errors import ModelLoadError, ThresherError

EXIT_USER = 2      # the input, config or environment is wrong: the message says what to change
EXIT_INTERNAL = 1  # unexpected: a bug or the machine
MAX_LINES = 6
MAX_LINE_CHARS = 300

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_RAY_NOISE = re.compile(r"\s*\(?\b(actor_id|pid|ip|repr|task_id|worker_id|node_id)[=:]\s*[^,)\s]+[,)]?")
_CHAINED = re.compile(r"^(The above exception was|During handling of the above exception)")
_EXC_LINE = re.compile(r"^(?P<cls>[A-Za-z_][\w.]*(?:Error|Exception|Exit))(?::\s?(?P<msg>.*))?$")


def debug_enabled() -> bool:
    return os.environ.get("THRESHER_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


def enable_debug() -> None:
    os.environ["THRESHER_DEBUG"] = "1"


def quiet_ray_reports() -> None:
    """No traceback dumps from Ray for errors reported here (unless debugging)."""
    if not debug_enabled():
        os.environ.setdefault("RAY_IGNORE_UNHANDLED_ERRORS", "1")


_TRACEBACK_START = re.compile(r"Traceback \(most recent call last\)|Exception raised in creation task|"
                              r"ray::\w+[.\w]*\(\)|RayTaskError|Unhandled error")


def _without_tracebacks(data: dict) -> dict | None:
    """A worker's stderr batch with any traceback cut off (from its first line to the batch's end)."""
    lines = data.get("lines") or []
    for i, line in enumerate(lines):
        if _TRACEBACK_START.search(line):
            if i == 0:
                return None
            return dict(data, lines=lines[:i])
    return data


def quiet_worker_tracebacks() -> None:
    """Drop the tracebacks Ray forwards from worker stderr to this driver (an actor's failed
    ``__init__`` prints ~40 lines); the error that stops the job is reported once, by
    :func:`report`. Other worker output still reaches the terminal. Not while debugging.

    Uses Ray's worker-log dispatcher (``ray._private.ray_logging``); if its shape changes, this
    does nothing.
    """
    if debug_enabled():
        return
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:  # pragma: no cover
        return
    with dispatcher._lock:
        handlers = list(dispatcher.handlers)
        if any(name == "thresher_quiet" for name, _ in handlers):
            return
        wrapped = []
        for name, handler in handlers:
            if name == "ray_print_logs":
                def quiet(data, _handler=handler):
                    data = _without_tracebacks(data)  # stderr, and the raylet's "task failed" reports
                    if data is not None:
                        _handler(data)

                wrapped.append((name, quiet))
            else:
                wrapped.append((name, handler))
        wrapped.append(("thresher_quiet", lambda data: None))  # marks the dispatcher as done
        dispatcher.handlers = wrapped
    _quiet_error_messages()


def _quiet_error_messages() -> None:
    """The errors Ray pushes to the driver (``(raylet) Task ... failed ... Traceback``: e.g. Ray Data
    retrying calls on an actor whose ``__init__`` raised) without their tracebacks. Ray prints them
    from its error-listener thread through ``ray._private.worker.print_to_stdstream``, not the
    worker-log dispatcher; if that shape changes, this does nothing."""
    try:
        import ray._private.worker as ray_worker
    except ImportError:  # pragma: no cover
        return
    original = getattr(ray_worker, "print_to_stdstream", None)
    if original is None or getattr(original, "thresher_quiet", False):
        return

    def quiet(data, *args, **kwargs):
        data = _without_tracebacks(data)
        if data is not None:
            original(data, *args, **kwargs)

    quiet.thresher_quiet = True
    ray_worker.print_to_stdstream = quiet


class _RayDataConsoleFilter(logging.Filter):
    """Only Ray Data's warnings reach the console (a stage's error, with Ray Data's own abbreviated
    traceback, is reported by :func:`report`; its info lines are execution bookkeeping), and not the
    one that says our progress bars replace Ray Data's."""

    def filter(self, record: logging.LogRecord) -> bool:
        if debug_enabled():
            return True
        if record.levelno != logging.WARNING:  # errors: reported by report(); info: Ray Data's bookkeeping
            return False
        return "Progress bars disabled" not in record.getMessage()


def quiet_ray_data_console() -> None:
    """Ray Data's console output without the errors reported once by :func:`report` (not while
    debugging); its log file (``ray-data.log`` in the Ray session) keeps everything."""
    try:
        import ray.data  # noqa: F401 - configures the "ray.data" logger and its handlers
    except ImportError:  # pragma: no cover
        return
    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler) and \
                not any(isinstance(f, _RayDataConsoleFilter) for f in handler.filters):
            handler.addFilter(_RayDataConsoleFilter())


def unwrap(exc: BaseException) -> BaseException:
    """The exception a worker raised, without Ray's RayTaskError / ActorDiedError wrappers."""
    try:
        from ray.exceptions import RayActorError, RayTaskError
    except ImportError:  # pragma: no cover - Ray is a dependency
        return exc
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, RayTaskError):
            cause = getattr(exc, "cause", None)
            if cause is None or cause is exc:
                break
            if type(cause).__name__ == "UserCodeException":  # Ray Data's wrapper of a stage's own error
                cause = cause.__cause__ or _from_text(str(exc)) or cause
            exc = cause
        elif isinstance(exc, RayActorError) and getattr(exc, "actor_init_failed", False):
            exc = _from_text(str(exc)) or exc
            break
        else:
            break
    return exc


def _from_text(text: str) -> BaseException | None:
    """The Thresher error whose ``module.Class: message`` ends a traceback's text, rebuilt."""
    import selector.errors as errors

    lines = _ANSI.sub("", text).splitlines()
    for i in range(len(lines) - 1, -1, -1):
        match = _EXC_LINE.match(lines[i].strip())
        if not match:
            continue
        name = match["cls"].rsplit(".", 1)[-1]
        cls = getattr(errors, name, None)
        if isinstance(cls, type) and issubclass(cls, ThresherError):
            rest = []
            for line in lines[i + 1:]:  # the message's own lines, up to Ray's text about the wrapper
                if _CHAINED.match(line) or line.startswith("ray::"):
                    break
                rest.append(line)
            message = "\n".join([match["msg"] or ""] + rest).strip()
            return cls(message)
    return None


def _compact(text: str, limit: int = MAX_LINES) -> str:
    lines = [line.rstrip() for line in _ANSI.sub("", text).strip().splitlines() if line.strip()]
    lines = [line if len(line) <= MAX_LINE_CHARS else line[:MAX_LINE_CHARS - 3] + "..." for line in lines]
    if len(lines) > limit:
        lines = lines[:limit - 1] + [f"  ... and {len(lines) - limit + 1} more lines (--debug shows everything)"]
    return "\n".join(lines)


def describe(exc: BaseException) -> tuple[int, str]:
    """``(exit code, message)`` for an exception that ended a command."""
    from selector.data.storage import request_uri, storage_error

    cause = unwrap(exc)
    if isinstance(cause, ThresherError):
        message = f"error: {cause}"
        if isinstance(cause, ModelLoadError) and "check:" not in message:
            message += ("\n  check: the path is a save_pretrained folder (config.json, weights, tokenizer files) "
                        "of the kind of model the config key asks for")
        return EXIT_USER, _compact(message)
    uri = request_uri(cause)
    storage = storage_error(cause, uri or "", what="the object" if uri else "a storage request")
    if storage is not None:
        return EXIT_USER, _compact(f"error: {storage}")
    if isinstance(cause, (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)) and \
            getattr(cause, "filename", None):
        return EXIT_USER, _compact(f"error: {cause.strerror or type(cause).__name__}: {cause.filename}")
    try:
        from ray.exceptions import OutOfMemoryError, RayActorError
    except ImportError:  # pragma: no cover
        OutOfMemoryError = RayActorError = ()  # noqa: N806
    if isinstance(cause, OutOfMemoryError):
        return EXIT_USER, _compact("error: a worker ran out of memory and was stopped by Ray.\n"
                                   "  check: fewer or smaller batches (corpus.batch_size, embed/influence "
                                   "batch_size), fewer workers (ray.*_workers); a rerun resumes finished stages")
    if isinstance(cause, RayActorError):
        first = _RAY_NOISE.sub("", str(cause).splitlines()[0] if str(cause) else "")
        return EXIT_INTERNAL, _compact(f"error: a worker process died: {first}\n"
                                       "  check: memory (dmesg), the worker logs under /tmp/ray/session_latest/logs; "
                                       "a rerun resumes finished stages (--debug for the traceback)")
    first = _RAY_NOISE.sub("", (str(cause).strip().splitlines() or [""])[0])
    return EXIT_INTERNAL, _compact(f"error: unexpected {type(cause).__name__}: {first}\n"
                                   "  this is probably a bug in Thresher: rerun with --debug and report the traceback")


def report(exc: BaseException, stream=None) -> int:
    """Print ``exc`` for a person (and the traceback when debugging); returns the exit code."""
    stream = stream or sys.stderr
    if debug_enabled():
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=stream)
    code, message = describe(exc)
    if code == EXIT_USER and not debug_enabled() and len(message.splitlines()) < MAX_LINES and \
            "--debug" not in message:
        message += "\n  (--debug or THRESHER_DEBUG=1 shows the traceback)"
    stream.flush()
    print(message, file=stream, flush=True)
    return code
