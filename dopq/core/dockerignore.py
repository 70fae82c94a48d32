"""``.dockerignore``: which files of a job folder ``dopq submit`` leaves out.

Docker's reading (moby's ``ignorefile`` and ``patternmatcher``), so a folder
sends DoPQ what it would send ``docker build``:

- one pattern a line; a line starting with ``#`` is a comment, blank lines
  are skipped; surrounding spaces are trimmed;
- a pattern is cleaned like a path (``./a``, ``/a`` and ``a/`` all mean ``a``)
  and is relative to the context root;
- ``*`` matches any run of characters but ``/``, ``?`` one such character,
  ``[a-z]`` a class (``[^a]`` negated), ``\\`` escapes; ``**`` matches any
  number of folders, none included (``**/*.pyc``, ``logs/**``);
- a pattern that matches a folder excludes everything below it;
- ``!pattern`` is an exception that brings matching files back; the last
  pattern that matches a path decides.

Unlike ``docker build``, which needs only the Dockerfile and
``.dockerignore`` itself, DoPQ also always sends ``container_config.json``
(and ``image.tar`` when the job loads it instead of building): the server
reads them, whatever the file says.
"""

from __future__ import annotations

import os
import posixpath
import re
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from dopq.core.context import tree
from dopq.core.errors import DopqError

IGNORE_FILE = ".dockerignore"
MAX_IGNORE_BYTES = 1024**2
ALWAYS_SENT = frozenset({"Dockerfile", IGNORE_FILE, "container_config.json"})


@dataclass(frozen=True)
class Pattern:
    text: str  # cleaned, without the '!'
    exception: bool
    regex: re.Pattern[str]

    def matches(self, rel: str) -> bool:
        """Whether this pattern matches ``rel`` or one of the folders above it."""
        if self.regex.match(rel):
            return True
        parts = rel.split("/")
        return any(self.regex.match("/".join(parts[:i])) for i in range(1, len(parts)))


class IgnoreRules:
    """The patterns of one ``.dockerignore``, in order."""

    def __init__(self, patterns: Iterable[Pattern] = ()) -> None:
        self.patterns = list(patterns)
        self.exceptions = [p for p in self.patterns if p.exception]

    @classmethod
    def parse(cls, text: str) -> IgnoreRules:
        patterns = []
        for number, line in enumerate(text.removeprefix("\ufeff").splitlines(), 1):
            if line.startswith("#"):
                continue
            line = line.strip()
            if not line:
                continue
            exception = line.startswith("!")
            if exception:
                line = line[1:].strip()
                if not line:
                    raise DopqError(f"{IGNORE_FILE} line {number}: '!' without a pattern")
            cleaned = posixpath.normpath(line).lstrip("/") or "."
            try:
                regex = re.compile(_translate(cleaned))
            except re.error:
                raise DopqError(f"{IGNORE_FILE} line {number}: bad pattern {line!r}") from None
            patterns.append(Pattern(cleaned, exception, regex))
        return cls(patterns)

    def excluded(self, rel: str) -> bool:
        """Whether the path ``rel`` (relative to the root, ``/``-separated) is left out."""
        matched = False
        for pattern in self.patterns:
            if pattern.exception != matched:
                continue  # only an exclusion can exclude, only an exception bring back
            if pattern.matches(rel):
                matched = not pattern.exception
        return matched

    def may_bring_back_below(self, rel_dir: str) -> bool:
        """Whether an exception may name something inside the excluded folder ``rel_dir``
        (else the walk skips the folder, as Docker does)."""
        prefix = rel_dir + "/"
        return any((p.text + "/").startswith(prefix) or "**" in p.text or p.text[:1] in "*?["
                   for p in self.exceptions)


def _translate(pattern: str) -> str:
    """moby's patternmatcher translation of a cleaned pattern into a regex."""
    out = ["^"]
    i, n = 0, len(pattern)
    while i < n:
        ch = pattern[i]
        if ch == "*":
            if i + 1 < n and pattern[i + 1] == "*":
                i += 1
                if i + 1 < n and pattern[i + 1] == "/":
                    i += 1
                out.append(".*" if i + 1 == n else "(?:.*/)?")
            else:
                out.append("[^/]*")
        elif ch == "?":
            out.append("[^/]")
        elif ch == "\\":
            if i + 1 < n:
                i += 1
                out.append(re.escape(pattern[i]))
            else:
                out.append(re.escape("\\"))
        elif ch == "[":
            end = pattern.find("]", i + 2 if pattern[i + 1:i + 2] in ("^", "]") else i + 1)
            if end < 0:
                raise re.error("unterminated class")
            body = pattern[i + 1:end].replace("\\", "\\\\")
            out.append(f"[{body}]")
            i = end
        else:
            out.append(re.escape(ch))
        i += 1
    out.append("$")
    return "".join(out)


def read_rules(folder: Path) -> IgnoreRules | None:
    """The rules of ``folder/.dockerignore``, or None when it has none."""
    path = Path(folder) / IGNORE_FILE
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise DopqError(f"{path}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        return None
    if st.st_size > MAX_IGNORE_BYTES:
        raise DopqError(f"{path}: larger than {MAX_IGNORE_BYTES} bytes")
    try:
        return IgnoreRules.parse(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise DopqError(f"{path}: not UTF-8 text") from None


def context_files(
    folder: Path, always: Iterable[str] = ALWAYS_SENT, rules: IgnoreRules | None = None,
) -> Iterator[tuple[str, Path, os.stat_result]]:
    """(relative posix path, path, lstat) of what to send from ``folder``, sorted
    as ``dopq.core.archive`` sorts: ``.dockerignore`` applied, ``always`` (names at the
    root) kept whatever it says. Excluded folders are not walked into."""
    folder = Path(folder)
    rules = read_rules(folder) if rules is None else rules
    keep = frozenset(always)

    def choose(rel: str, is_dir: bool) -> tuple[bool, bool]:
        if rules is None or rel in keep or not rules.excluded(rel):
            return True, is_dir
        # an excluded folder's entry is left out, not the files a '!' line keeps below it
        return False, is_dir and rules.may_bring_back_below(rel)

    yield from tree(folder, choose)
