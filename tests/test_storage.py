"""Locations: local paths and `pyarrow.fs` URIs, joined, pinned down, read and fetched (the S3
side of the same functions runs against a moto server in test_s3.py)."""

from pathlib import Path

import pytest

from apollo_ray.storage import absolute, fetch, filesystem, is_uri, join_uri, read_bytes

S3 = "s3://bucket?endpoint_override=127.0.0.1:9000&scheme=http"


def test_is_uri():
    assert is_uri("s3://bucket/key") and is_uri("gs://b") and is_uri("file:///tmp/x")
    assert is_uri(S3)
    assert not is_uri("/tmp/x") and not is_uri("runs/a") and not is_uri(Path("/tmp/x"))


def test_join_uri_keeps_the_query_at_the_end():
    assert join_uri(S3, "ray", "trial-1") == (
        "s3://bucket/ray/trial-1?endpoint_override=127.0.0.1:9000&scheme=http"
    )
    assert join_uri("s3://bucket/prefix/", "a") == "s3://bucket/prefix/a"
    assert join_uri("/data/runs", "a", "b.pt") == "/data/runs/a/b.pt"
    assert join_uri("runs/", "a") == "runs/a"
    assert join_uri(S3) == S3


def test_absolute_resolves_paths_and_leaves_uris_alone(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert absolute("runs/a") == str(tmp_path / "runs" / "a")
    assert absolute("../x") == str(tmp_path.parent / "x")
    assert absolute(str(tmp_path / "a" / ".." / "b")) == str(tmp_path / "b")
    for uri in (S3, "s3://bucket/../x", "gs://b/runs", "file:///tmp/../x"):
        assert absolute(uri) == uri


def test_read_bytes_of_a_path_and_a_file_uri(tmp_path):
    path = tmp_path / "blob.bin"
    path.write_bytes(b"\x00apollo\xff")
    assert read_bytes(path) == read_bytes(str(path)) == b"\x00apollo\xff"
    assert read_bytes(f"file://{path}") == b"\x00apollo\xff"
    fs, inside = filesystem(f"file://{path}")
    assert inside == str(path) and fs.type_name == "local"
    with pytest.raises(OSError):
        read_bytes(tmp_path / "missing.bin")


def test_fetch_copies_a_file_or_says_there_is_none(tmp_path):
    source = tmp_path / "src" / "checkpoint.pt"
    source.parent.mkdir()
    source.write_bytes(b"weights")
    dest = tmp_path / "dest.pt"
    assert fetch(str(source), dest) is True
    assert dest.read_bytes() == b"weights"
    again = tmp_path / "via-uri.pt"
    assert fetch(f"file://{source}", again) is True and again.read_bytes() == b"weights"
    missing = tmp_path / "not-fetched.pt"
    assert fetch(str(tmp_path / "src" / "missing.pt"), missing) is False
    assert fetch(str(source.parent), missing) is False  # a folder is not a file
    assert not missing.exists()
