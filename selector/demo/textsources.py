"""Real text that every CPython install carries, plus synthetic low-quality text.

Used by the demo, the tests and the quality benchmark, so nothing is downloaded:

* ``pydoc_topics``  - the prose of ``pydoc_data.topics`` (the language reference topics);
* ``docstrings``    - long docstrings of stdlib modules, classes and functions (parsed with
                      ``ast``, never imported, so no module side effects);
* ``source_files``  - stdlib ``.py`` files, split into module-sized chunks;
* ``man_pages``     - rendered manual pages (system calls, library functions, file formats,
                      overviews, admin commands: sections 2, 3, 5, 7, 8), where ``man`` is installed;
* ``synthetic_low_quality`` - boilerplate, shuffled words and repeated spam, the kinds of
                      documents a selector should learn to avoid.

Every generator is deterministic: sources are read in sorted order and the synthetic
documents come from a seeded ``random.Random``.
"""

from __future__ import annotations

import ast
import random
import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

# Test suites and vendored/generated code are not representative prose or code.
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "lib2to3", "turtledemo", "__pycache__",
              "ensurepip", "pydoc_data", "encodings", "unittest"}


@dataclass(frozen=True)
class TextDoc:
    """One document: its source kind, a stable name and its text."""

    source: str
    name: str
    text: str


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_py_files() -> list[Path]:
    root = stdlib_dir()
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).parts
        if any(part in _SKIP_DIRS for part in rel):
            continue
        files.append(path)
    return files


def pydoc_topics(min_chars: int = 200) -> Iterator[TextDoc]:
    """The language-reference topics shipped in ``pydoc_data.topics``."""
    from pydoc_data.topics import topics

    for name in sorted(topics):
        text = topics[name].strip()
        if len(text) >= min_chars:
            yield TextDoc("pydoc_topics", name, text)


def docstrings(min_chars: int = 400) -> Iterator[TextDoc]:
    """Long docstrings of stdlib modules, classes and functions, read with ``ast``."""
    root = stdlib_dir()
    for path in _stdlib_py_files():
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        module = ".".join(path.relative_to(root).with_suffix("").parts)
        nodes = [tree] + [n for n in ast.walk(tree)
                          if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
        for node in nodes:
            doc = ast.get_docstring(node)
            if doc and len(doc) >= min_chars:
                # The line number keeps names unique (same-named methods of different classes).
                name = module if node is tree else f"{module}.{node.name}@{node.lineno}"
                yield TextDoc("docstrings", name, doc)


def source_files(max_chars: int = 6000, min_chars: int = 300) -> Iterator[TextDoc]:
    """Stdlib source code, each file cut at blank lines into chunks of at most ``max_chars``."""
    root = stdlib_dir()
    for path in _stdlib_py_files():
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, ValueError):
            continue
        rel = str(path.relative_to(root))
        chunk: list[str] = []
        size = 0
        part = 0
        for block in text.split("\n\n"):
            if size + len(block) > max_chars and chunk:
                body = "\n\n".join(chunk).strip()
                if len(body) >= min_chars:
                    yield TextDoc("source_files", f"{rel}#{part}", body)
                    part += 1
                chunk, size = [], 0
            chunk.append(block[:max_chars])
            size += len(block) + 2
        body = "\n\n".join(chunk).strip()
        if len(body) >= min_chars:
            yield TextDoc("source_files", f"{rel}#{part}", body)


MAN_SECTIONS = ("man2", "man3", "man5", "man7", "man8")


def man_pages(max_docs: int | None = None, min_chars: int = 400, seed: int = 0,
              root: str = "/usr/share/man", sections: tuple[str, ...] = MAN_SECTIONS) -> Iterator[TextDoc]:
    """English manual pages rendered to plain text (``man -l -P cat``, overstrikes removed).

    Section 1 is left out: on these machines it is dominated by templated cloud-CLI pages. Pages
    are taken in a seeded shuffle of their sorted paths (``max_docs`` caps the rendering cost);
    ``.so`` redirect stubs and pages that fail to render are skipped. Yields nothing where ``man``
    is not installed.
    """
    import os
    import shutil
    import subprocess

    if shutil.which("man") is None:
        return
    paths = sorted(str(p) for sec in sections for p in (Path(root) / sec).glob("*") if p.is_file())
    random.Random(seed).shuffle(paths)
    env = {**os.environ, "MANWIDTH": "80", "MAN_KEEP_FORMATTING": "0", "LC_ALL": "C.UTF-8"}
    n = 0
    for path in paths:
        if max_docs is not None and n >= max_docs:
            return
        try:
            out = subprocess.run(["man", "-l", "-P", "cat", path], capture_output=True, env=env, timeout=20).stdout
        except (OSError, subprocess.SubprocessError):
            continue
        # col -b semantics: drop backspace overstrikes (bold "X\bX", underline "_\bX")
        text = re.sub(".\b", "", out.decode("utf-8", errors="replace")).strip()
        if len(text) < min_chars or "\ufffd" in text:
            continue
        name = os.path.relpath(path, root)
        n += 1
        yield TextDoc("man_pages", name, text)


_BOILERPLATE = [
    "Copyright (c) {year} {org}. All rights reserved. Unauthorized copying of this file, via any "
    "medium, is strictly prohibited. Proprietary and confidential.",
    "This website uses cookies to ensure you get the best experience on our website. By continuing "
    "to browse you agree to our use of cookies. Learn more. Accept all. Reject all. Settings.",
    "Click here to subscribe to our newsletter! Enter your email address below and never miss an "
    "update. Unsubscribe at any time. Privacy policy. Terms of service. Contact us.",
    "Home | About | Products | Blog | Careers | Contact | Login | Sign up | Cart (0) | Search | "
    "Follow us on social media | Back to top",
]
_SPAM = ["BUY NOW", "best price", "cheap", "free shipping", "limited offer", "click here", "winner",
         "100% guaranteed", "act now", "discount"]


def synthetic_low_quality(n: int, seed: int = 0, vocabulary_from: list[str] | None = None) -> Iterator[TextDoc]:
    """``n`` low-quality documents, cycling through three kinds.

    * boilerplate: cookie banners, copyright notices and navigation bars, repeated;
    * shuffled: real words (taken from ``vocabulary_from``) in random order, no syntax;
    * spam: a few marketing phrases repeated many times.
    """
    rng = random.Random(seed)
    words: list[str] = []
    for text in vocabulary_from or [d.text for d, _ in zip(pydoc_topics(), range(30))]:
        words.extend(text.split())
    if not words:
        raise ValueError("synthetic_low_quality needs a non-empty vocabulary")
    for i in range(n):
        kind = i % 3
        if kind == 0:
            parts = [rng.choice(_BOILERPLATE).format(year=rng.randint(1998, 2026),
                                                     org=rng.choice(["Acme Corp", "Example Inc", "Foo LLC"]))
                     for _ in range(rng.randint(3, 8))]
            yield TextDoc("boilerplate", f"boilerplate-{i}", "\n".join(parts))
        elif kind == 1:
            n_words = rng.randint(80, 400)
            yield TextDoc("shuffled", f"shuffled-{i}", " ".join(rng.choice(words) for _ in range(n_words)))
        else:
            phrases = rng.sample(_SPAM, 3)
            yield TextDoc("spam", f"spam-{i}", " ".join(rng.choice(phrases) + "!" for _ in range(rng.randint(40, 150))))


def demo_documents(max_docs_per_source: int | None = None, n_low_quality: int = 300, seed: int = 0) -> list[TextDoc]:
    """The demo corpus: all three real sources plus synthetic low-quality documents."""
    docs: list[TextDoc] = []
    for gen in (pydoc_topics(), docstrings(), source_files()):
        for i, doc in enumerate(gen):
            if max_docs_per_source is not None and i >= max_docs_per_source:
                break
            docs.append(doc)
    docs.extend(synthetic_low_quality(n_low_quality, seed=seed))
    return docs
