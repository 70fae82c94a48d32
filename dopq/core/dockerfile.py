"""Which images a Dockerfile reads: a small, strict parser (no I/O).

A build may read other images in ``FROM``, ``COPY --from=``, ``ADD --from=``,
``RUN --mount=...,from=...`` and in ``ONBUILD`` versions of these. ``references``
returns every such reference that is not a build stage of the same file, so
the caller can check each against the images the user may read
(``dopq.server.images.check_references``). Anything this parser cannot read for sure
(a variable it cannot resolve, a parser directive that changes the frontend)
is refused with ``JobRejected`` rather than guessed.

It follows the classic builder's reading, which is what DoPQ's engine runs:
lines joined at the escape character, comments and blank lines skipped,
heredoc bodies read as instructions (a ``FROM`` inside one is checked too),
global ``ARG`` defaults substituted in ``FROM``, stage names case-insensitive
and stages also named by their index.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from dopq.core.errors import JobRejected

_DIRECTIVE = re.compile(r"^#\s*([a-zA-Z][a-zA-Z0-9]*)\s*=\s*(.*?)\s*$")
_VAR = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)(?:(:[-+])([^}]*))?\}|([A-Za-z_][A-Za-z0-9_]*))")
_NAME = re.compile(r"^[a-z][a-z0-9_.-]*$")


@dataclass(frozen=True)
class Reference:
    """One image a build would read."""

    ref: str
    instruction: str  # FROM, COPY --from, ADD --from, RUN --mount, ONBUILD ...
    line: int


def _logical_lines(text: str) -> tuple[list[tuple[int, str]], str]:
    """Parser directives applied; return (line number, joined instruction) pairs."""
    lines = text.splitlines()
    escape = "\\"
    seen: set[str] = set()
    start = 0
    for i, raw in enumerate(lines):
        m = _DIRECTIVE.match(raw.strip())
        if not m:
            break
        key, value = m.group(1).lower(), m.group(2)
        if key in seen:
            break
        seen.add(key)
        if key == "syntax":
            raise JobRejected(
                f"Dockerfile line {i + 1}: '# syntax=' directives are not allowed "
                "(they pull a build frontend image)")
        if key == "escape":
            if value not in ("\\", "`"):
                raise JobRejected(f"Dockerfile line {i + 1}: escape must be \\ or `")
            escape = value
        elif key != "check":
            break  # an unknown directive is a comment, and ends the directives
        start = i + 1
    out: list[tuple[int, str]] = []
    buf: list[str] = []
    first = 0
    for i in range(start, len(lines)):
        raw = lines[i]
        stripped = raw.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and (not stripped or stripped.startswith("#")):
            continue  # comments and empty lines inside a continuation are dropped
        if not buf:
            first = i + 1
        body = raw.rstrip()
        if body.endswith(escape):
            buf.append(body[:-1])
            continue
        buf.append(raw)
        out.append((first, " ".join(part.strip() for part in buf).strip()))
        buf = []
    if buf:
        out.append((first, " ".join(part.strip() for part in buf).strip()))
    return out, escape


def _substitute(value: str, args: dict[str, str | None], line: int) -> str:
    def repl(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(4)
        op, word = m.group(2), m.group(3) or ""
        if name not in args or args[name] is None:
            if op == ":-":
                return word
            if op == ":+":
                return ""
            raise JobRejected(f"Dockerfile line {line}: ${name} has no value "
                              "(declare it with ARG {name}=... before the first FROM)")
        val = args[name] or ""
        if op == ":-":
            return val or word
        if op == ":+":
            return word if val else ""
        return val

    result = _VAR.sub(repl, value)
    if "$" in result:
        raise JobRejected(f"Dockerfile line {line}: cannot resolve {value!r}")
    return result


def _split_flags(rest: str) -> tuple[list[str], list[str]]:
    words = rest.split()
    flags = []
    while words and words[0].startswith("--"):
        flags.append(words.pop(0))
    return flags, words


def _flag(flags: list[str], name: str) -> str | None:
    value = None
    for f in flags:
        key, eq, val = f[2:].partition("=")
        if key.lower() == name:
            value = val if eq else ""
    return value


def _mount_froms(flags: list[str]) -> list[str]:
    out = []
    for f in flags:
        key, _, val = f[2:].partition("=")
        if key.lower() != "mount":
            continue
        for part in val.split(","):
            k, _, v = part.partition("=")
            if k.strip().lower() == "from":
                out.append(v.strip().strip("\"'"))
    return out


def references(text: str) -> list[Reference]:
    """Every image (not a stage of this file, not ``scratch``) the build reads."""
    if "\0" in text:
        raise JobRejected("Dockerfile contains a NUL byte")
    instructions, _ = _logical_lines(text)
    global_args: dict[str, str | None] = {}
    stages: list[str | None] = []  # stage names (None when unnamed), in order
    out: list[Reference] = []

    def is_stage(ref: str) -> bool:
        low = ref.lower()
        if low.isdigit():
            return int(low) < len(stages)
        return low in {s for s in stages if s}

    def add(ref: str, instruction: str, line: int, stage_ok: bool = True) -> None:
        if not ref:
            raise JobRejected(f"Dockerfile line {line}: {instruction} without an image")
        if "$" in ref:
            raise JobRejected(f"Dockerfile line {line}: variables are not allowed in "
                              f"{instruction} ({ref})")
        if ref.lower() == "scratch" or (stage_ok and is_stage(ref)):
            return
        out.append(Reference(ref, instruction, line))

    def check(keyword: str, rest: str, line: int, prefix: str, onbuild: bool) -> None:
        flags, words = _split_flags(rest)
        if keyword == "FROM":
            if onbuild:
                raise JobRejected(f"Dockerfile line {line}: ONBUILD FROM is not allowed")
            if not words:
                raise JobRejected(f"Dockerfile line {line}: FROM without an image")
            platform = _flag(flags, "platform")
            if platform is not None:
                _substitute(platform, {**global_args, "BUILDPLATFORM": "",
                                       "TARGETPLATFORM": ""}, line)
            ref = _substitute(words[0], global_args, line)
            name: str | None = None
            if len(words) == 3 and words[1].lower() == "as":
                name = words[2].lower()
                if not _NAME.match(name):
                    raise JobRejected(f"Dockerfile line {line}: bad stage name {words[2]!r}")
            elif len(words) != 1:
                raise JobRejected(f"Dockerfile line {line}: FROM takes an image and "
                                  "optionally AS <name>")
            add(ref, "FROM", line)
            stages.append(name)
        elif keyword in ("COPY", "ADD"):
            src = _flag(flags, "from")
            if src is not None:
                add(src.strip("\"'"), f"{prefix}{keyword} --from", line, stage_ok=not onbuild)
        elif keyword == "RUN":
            for src in _mount_froms(flags):
                add(src, f"{prefix}RUN --mount from", line, stage_ok=not onbuild)
        elif keyword == "ONBUILD":
            if onbuild:
                raise JobRejected(f"Dockerfile line {line}: ONBUILD ONBUILD is not allowed")
            inner, _, inner_rest = rest.partition(" ")
            check(inner.upper(), inner_rest.strip(), line, "ONBUILD ", True)

    for line, instruction in instructions:
        keyword, _, rest = instruction.partition(" ")
        keyword = keyword.upper()
        rest = rest.strip()
        if keyword == "ARG" and not stages:
            for word in rest.split():
                key, eq, val = word.partition("=")
                global_args[key] = _substitute(val.strip("\"'"), global_args, line) if eq \
                    else global_args.get(key)
            continue
        check(keyword, rest, line, "", False)
    if not stages:
        raise JobRejected("Dockerfile has no FROM instruction")
    return out


def onbuild_references(triggers: list[str]) -> list[Reference]:
    """The images that an image's ONBUILD triggers (from its config) would read."""
    out: list[Reference] = []
    for i, trigger in enumerate(triggers):
        text = f"FROM scratch\nONBUILD {trigger}\n"
        for ref in references(text):
            out.append(Reference(ref.ref, ref.instruction, i + 1))
    return out
