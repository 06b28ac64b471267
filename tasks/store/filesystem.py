"""Local paths and s3:// alike through pyarrow.fs, with atomic writes and whole-file reads.

S3: the endpoint comes from $AWS_ENDPOINT_URL or $METAPIPE_S3_ENDPOINT (e.g.
http://127.0.0.1:9000), the region from $AWS_REGION / $AWS_DEFAULT_REGION, and
credentials from the usual AWS environment variables.
"""
from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Callable
from contextlib import suppress
from typing import BinaryIO

import pyarrow as pa
import pyarrow.fs as pafs


def resolve(path: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem of ``path`` and the path inside it (``bucket/prefix`` for S3, absolute for local)."""
    if path.startswith("s3://"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("METAPIPE_S3_ENDPOINT")
        options: dict = {"region": os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"}
        if endpoint:
            scheme, _, host = endpoint.rpartition("://")
            options |= {"endpoint_override": host, "scheme": scheme or "https"}
        return pafs.S3FileSystem(**options), path.removeprefix("s3://").rstrip("/")
    return pafs.LocalFileSystem(), os.path.abspath(path)


class _Hashing:
    """A writable file that forwards to ``out`` and keeps the sha256 and size of what passed."""

    def __init__(self, out: pa.NativeFile) -> None:
        self.out, self.digest, self.size, self.closed = out, hashlib.sha256(), 0, False

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.size += len(data)
        return self.out.write(data)

    def flush(self) -> None:
        self.out.flush()

    def close(self) -> None:
        self.closed = True


def write_streamed(fs: pafs.FileSystem, path: str, write: Callable[[BinaryIO], None]) -> tuple[str, int]:
    """Write ``path`` through ``write(file)`` to a temporary name beside it, then move it into place;
    the hex sha256 and size of what was written. Nothing needs to be whole in memory."""
    parent = path.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    temporary = f"{path}.tmp-{uuid.uuid4().hex}"
    try:
        with fs.open_output_stream(temporary) as out:
            sink = _Hashing(out)
            write(sink)
    except BaseException:
        with suppress(*ArrowError):  # the error that stopped the write is the one to report
            delete(fs, temporary)
        raise
    fs.move(temporary, path)
    return sink.digest.hexdigest(), sink.size


def write_atomic(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write ``data`` to a temporary name beside ``path``, then move it into place."""
    write_streamed(fs, path, lambda file: file.write(data))


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    """The whole file; FileNotFoundError when it does not exist."""
    with fs.open_input_stream(path) as f:
        return f.read()


def exists(fs: pafs.FileSystem, path: str) -> bool:
    """Whether ``path`` is a file."""
    return fs.get_file_info(path).type == pafs.FileType.File


def delete(fs: pafs.FileSystem, path: str) -> None:
    """Remove the file ``path`` if it exists."""
    if exists(fs, path):
        fs.delete_file(path)


def sha256_hex(data: bytes | BinaryIO) -> str:
    """Hex sha256 of ``data``: bytes, or a binary file object read to its end in 1 MiB blocks."""
    digest = hashlib.sha256()
    if isinstance(data, (bytes, bytearray, memoryview)):
        digest.update(data)
    else:
        for block in iter(lambda: data.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


ArrowError = (pa.ArrowException, OSError)
"""What pyarrow raises for I/O problems (missing files, refused connections, denied access)."""
