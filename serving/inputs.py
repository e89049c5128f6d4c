"""Where batch inputs come from: lazy listing of files, folders, globs, list files and stdin, and capped reads.

Listing is a generator all the way down, so a folder of a million images costs one directory's worth of names at a
time, never the whole list. Order is deterministic (entries sorted within each directory), which is what lets an
interrupted run be resumed and compared with an uninterrupted one.
"""

from __future__ import annotations

import fnmatch
import io
import os
import stat
import sys
from collections.abc import Iterable, Iterator
from typing import IO

from serving.errors import BodyTooLarge, UnreadableInput

# What a folder walk picks up. Files named explicitly (argument, glob, list file, stdin) are taken whatever their
# extension: the decoder's allowlist is the judge of what is an image, not the file name.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".gif", ".bmp", ".dib", ".tif", ".tiff",
                              ".webp", ".ppm", ".pgm", ".pbm", ".pnm", ".avif", ".heic", ".heif", ".hif"})
# The service's default request-body limit; the CLI reads its value from serving.config when that exists.
DEFAULT_MAX_BYTES = 20 * 1024 * 1024
STDIN = "-"


class InputSpecError(ValueError):
    """An argument that can't be listed at all (a missing @list file): a usage error, reported before any work."""


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _has_magic(s: str) -> bool:
    return any(c in s for c in "*?[")


def walk_images(root: str) -> Iterator[str]:
    """Image files under `root`, depth first, sorted by name in each directory; hidden entries and links to
    directories are skipped (no cycles). A subdirectory that can't be listed is yielded itself, so it becomes an
    `unreadable_input` record instead of silently vanishing."""
    # Only the names that matter are kept (folders marked with a trailing separator), as plain strings: the one
    # per-directory list a walk must hold in order to sort stays small even for a folder of a million images.
    names: list[str] = []
    try:
        with os.scandir(root) as it:
            for entry in it:
                if entry.name.startswith("."):
                    continue
                try:
                    if entry.is_dir(follow_symlinks=False):
                        names.append(entry.name + os.sep)
                    elif is_image_name(entry.name) and entry.is_file():
                        names.append(entry.name)
                except OSError:
                    names.append(entry.name)  # can't even stat it: let the read report why
    except OSError:
        yield root
        return
    names.sort()
    for name in names:
        if name.endswith(os.sep):
            yield from walk_images(os.path.join(root, name[:-1]))
        else:
            yield os.path.join(root, name)


def iglob_sorted(pattern: str, final: bool = True) -> Iterator[str]:
    """Like glob.iglob(pattern, recursive=True) but sorted within each directory, and lazy across directories.

    `**` matches any number of directories (including none); as the last component it stands for every image file
    below. Hidden names only match pattern components that start with a dot.
    """
    head, tail = os.path.split(pattern)
    if not tail:  # "dir/" — the pattern names directories
        yield from (p for p in iglob_sorted(head, final=False) if os.path.isdir(p))
        return
    if head and _has_magic(head):
        dirs: Iterable[str] = (d for d in iglob_sorted(head, final=False) if os.path.isdir(d))
    else:
        dirs = [head]
    for d in dirs:
        if not _has_magic(tail):
            path = os.path.join(d, tail)
            if os.path.lexists(path):
                yield path
        elif tail == "**":
            yield from walk_images(d or os.curdir) if final else _recursive_dirs(d)
        else:
            for name in _sorted_names(d):
                if fnmatch.fnmatchcase(name, tail) and (tail.startswith(".") or not name.startswith(".")):
                    yield os.path.join(d, name)


def _sorted_names(directory: str) -> list[str]:
    try:
        return sorted(os.listdir(directory or os.curdir))
    except OSError:
        return []


def _recursive_dirs(d: str) -> Iterator[str]:
    """`**`: the directory itself, then every non-hidden directory below it (glob's recursive semantics)."""
    yield d
    for name in _sorted_names(d):
        path = os.path.join(d, name)
        if not name.startswith(".") and os.path.isdir(path) and not os.path.islink(path):
            yield from _recursive_dirs(path)


def _list_file_lines(stream: IO[str]) -> Iterator[str]:
    for line in stream:
        line = line.rstrip("\r\n")
        if line.strip() and not line.lstrip().startswith("#"):
            yield line


# A NUL-separated list (--null) longer than this with no NUL is not a list of paths: most likely a newline-separated
# one given with --null, or a file that is not a list at all. Refused rather than held in memory whole.
MAX_NULL_RECORD_BYTES = 1 << 20


def _null_records(stream: IO[bytes], name: str) -> Iterator[str]:
    """Records separated by NUL bytes (`find -print0`, `xargs -0`), decoded as the OS decodes file names; each is one
    path exactly (a newline is part of the name), empty records skipped. Read as the bytes arrive, not to EOF."""
    read = getattr(stream, "read1", stream.read)
    encoding, pending = sys.getfilesystemencoding(), bytearray()
    while chunk := read(65536):
        if b"\0" not in chunk:
            pending += chunk
            if len(pending) > MAX_NULL_RECORD_BYTES:
                raise InputSpecError(f"{name}: over {MAX_NULL_RECORD_BYTES} bytes without a NUL separator; --null "
                                     "lists are NUL-separated (find -print0), not one path per line")
            continue
        *records, rest = (pending + chunk).split(b"\0")
        pending = bytearray(rest)
        for record in records:
            if record:
                yield record.decode(encoding, "surrogateescape")
    if pending:
        yield pending.decode(encoding, "surrogateescape")


def _stdin_paths() -> IO[str]:
    """stdin decoded the way the OS decodes file names, so any path bytes round-trip (not strict UTF-8)."""
    return io.TextIOWrapper(sys.stdin.buffer, encoding=sys.getfilesystemencoding(), errors="surrogateescape")


def check_specs(specs: list[str]) -> None:
    """Fail fast on arguments that can't be listed, before a long run starts and produces half an output."""
    if specs.count(STDIN) > 1:
        raise InputSpecError("'-' (read paths from stdin) can be given only once")
    for spec in specs:
        if spec.startswith("@") and spec != "@":
            path = spec[1:]
            if not os.path.isfile(path) or not os.access(path, os.R_OK):
                raise InputSpecError(f"list file {path!r} does not exist or can't be read")


def expand(spec: str, stdin: IO[str] | None = None, nested: bool = False, null: bool = False) -> Iterator[str]:
    """One input argument → the paths it stands for, lazily.

    `-` reads one path per line from stdin, `@list.txt` one per line from a file (blank lines and `#` comments
    skipped); with `null`, both are NUL-separated instead (`_null_records`). Each such entry is expanded like an
    argument (so a list may name folders and globs, but not other lists). An existing directory is walked; a glob
    pattern that isn't an existing path is matched; anything else is yielded as is, so a missing file becomes an
    `unreadable_input` record rather than disappearing.
    """
    if not nested and spec == STDIN:
        if null:
            entries = _null_records(stdin.buffer if stdin is not None else sys.stdin.buffer, "stdin")
        else:
            entries = _list_file_lines(stdin if stdin is not None else _stdin_paths())
        for entry in entries:
            yield from expand(entry, nested=True)
    elif not nested and spec.startswith("@") and spec != "@":
        with open(spec[1:], "rb") as f:
            entries = (_null_records(f, spec[1:]) if null
                       else _list_file_lines(io.TextIOWrapper(f, encoding="utf-8", errors="surrogateescape")))
            for entry in entries:
                yield from expand(entry, nested=True)
    elif os.path.isdir(spec):
        yield from walk_images(spec)
    elif _has_magic(spec) and not os.path.lexists(spec):
        matched = False
        for path in iglob_sorted(spec):
            matched = True
            if os.path.isdir(path):
                yield from walk_images(path)
            else:
                yield path
        if not matched:
            yield spec  # reported as "no such file", like a shell with failglob
    else:
        yield spec


def iter_inputs(specs: list[str], stdin: IO[str] | None = None, null: bool = False) -> Iterator[str]:
    """All arguments' paths, in argument order (`null`: list files and stdin are NUL-separated)."""
    for spec in specs:
        yield from expand(spec, stdin, null=null)


def read_input(path: str, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """A file's bytes, refusing before reading anything that is over `max_bytes` or not a regular file.

    The size is checked on the open descriptor (no race with a file swapped after a stat) and the read itself is
    capped, so a file that grows while we read can't push us past the limit either.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise UnreadableInput(f"no such file: {path}") from None
    except PermissionError:
        raise UnreadableInput(f"permission denied: {path}") from None
    except OSError as e:
        raise UnreadableInput(f"cannot open {path}: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise UnreadableInput(f"{path} is a directory that could not be listed")
        if not stat.S_ISREG(st.st_mode):
            raise UnreadableInput(f"{path} is not a regular file")
        if st.st_size > max_bytes:
            raise BodyTooLarge(f"the file is {st.st_size} bytes, over the {max_bytes}-byte limit")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise BodyTooLarge(f"the file grew past the {max_bytes}-byte limit while being read")
        return data
    except OSError as e:
        raise UnreadableInput(f"cannot read {path}: {e.strerror or e}") from None
    finally:
        os.close(fd)
