"""Where files live: a local path or a `pyarrow.fs` URI (`s3://`, `gs://`, `file://`, ...).

Every other module passes locations as strings through these functions; this is the one place
that knows what a URI is, how to join one (its query, such as `?endpoint_override=...`, stays at
the end), how to open it and how to pin a local path down before it crosses to another process.
"""

from __future__ import annotations

import re
from pathlib import Path

import pyarrow.fs

__all__ = ["absolute", "fetch", "filesystem", "is_uri", "join_uri", "read_bytes", "redact"]

# `scheme://user:password@`: the password runs to the first `@` (one inside it is written %40),
# as SQLAlchemy reads it; a `${VAR}` or `$VAR` reference is no secret.
_CREDENTIAL = re.compile(
    r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*://[^:/@\s'\"]*:)(?P<password>[^@\s'\"]+)@"
)
_REFERENCE = re.compile(r"\$(\{\w+\}|\w+)")


def is_uri(location: str | Path) -> bool:
    """Whether `location` is a URI (`scheme://...`) rather than a local path."""
    return "://" in str(location)


def redact(text: str) -> str:
    """`text` with the password of every URI in it (`scheme://user:password@host`) replaced by
    `***`, user and host kept: what may be logged or shown."""

    def hide(m: re.Match[str]) -> str:
        if _REFERENCE.fullmatch(m["password"]):
            return m[0]
        return f"{m['head']}***@"

    return _CREDENTIAL.sub(hide, text)


def join_uri(location: str, *parts: str) -> str:
    """`location/part/...` for a path or a URI, keeping a URI's query at the end."""
    base, sep, query = str(location).partition("?")
    return "/".join([base.rstrip("/"), *parts]) + sep + query


def filesystem(location: str | Path) -> tuple[pyarrow.fs.FileSystem, str]:
    """(file system, path inside it) of a local path or a URI."""
    if is_uri(location):
        return pyarrow.fs.FileSystem.from_uri(str(location))
    return pyarrow.fs.LocalFileSystem(), str(location)


def absolute(location: str) -> str:
    """A local path made absolute (Ray runs trials and workers in other working directories);
    a URI as it is."""
    return location if is_uri(location) else str(Path(location).resolve())


def read_bytes(location: str | Path) -> bytes:
    """The whole file at `location`; OSError if it cannot be read."""
    fs, path = filesystem(location)
    with fs.open_input_stream(path) as f:
        return f.read()


def exists(location: str) -> bool:
    """Whether there is a file at `location` (a path or a URI)."""
    fs, path = filesystem(location)
    return fs.get_file_info(path).type == pyarrow.fs.FileType.File


def fetch(location: str, dest: Path) -> bool:
    """Copy the file at `location` to the local `dest`; False if there is no such file."""
    if not exists(location):
        return False
    fs, path = filesystem(location)
    pyarrow.fs.copy_files(
        path, str(dest), source_filesystem=fs, destination_filesystem=pyarrow.fs.LocalFileSystem()
    )
    return True
