"""Files that survive a crash, Ctrl-C or a full disk: written whole (the old file or none, never half of one), or as JSON lines read back up to a line a crash tore."""
import functools
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # for the type hint alone: this file imports nothing heavy
    import matplotlib.figure


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary name beside `path` to write to; renamed onto `path` only when the block ends normally,
    after the bytes reached the disk. On any error (or Ctrl-C) the temporary file is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: Path, data: str | bytes, encoding: str = "utf-8", errors: str = "strict") -> Path:
    """The whole file at once: `data` as text in `encoding`, or bytes."""
    with atomic_path(path) as tmp:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data, encoding=encoding, errors=errors)
    return Path(path)


def save_with(path: Path, save: Callable[[Path], object]) -> Path:
    """`save(tmp)` writes the file in its own way (torch.save, onnx, PIL); it appears whole at `path`."""
    with atomic_path(path) as tmp:
        save(tmp)
    return Path(path)


def save_figure(figure: "matplotlib.figure.Figure", path: Path, dpi: int = 100) -> Path:
    """A matplotlib figure, written whole in the format its name's suffix says (PNG without one): the
    temporary name ends in .tmp<pid>, which matplotlib would not know, so the format is given."""
    return save_with(path, lambda tmp: figure.savefig(tmp, dpi=dpi, format=(Path(path).suffix or ".png")[1:].lower()))


def file_sha256(path: Path, extra: str = "") -> "hashlib._Hash":
    """sha256 of a file's bytes, then of `extra`: the digest, to update further or read (what keys the network
    cache and the teacher's records to the weights' bytes). The bytes are read once per process while the file
    keeps its size and time: a start asks for several cache entries of one weights file, 22 ms each to hash."""
    stat = os.stat(path)
    digest = bytes_sha256(os.path.realpath(path), stat.st_size, stat.st_mtime_ns).copy()
    digest.update(extra.encode())
    return digest


@functools.lru_cache(maxsize=16)
def bytes_sha256(path: str, size: int, mtime_ns: int) -> "hashlib._Hash":
    """file_sha256's reading, a megabyte at a time; size and time are part of the key, not read here."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest


def resume_json_lines(path: Path) -> list[dict]:
    """The records of a JSON Lines file a cut-short run wrote, the line a crash tore at its end cut off the
    file itself, so that appending goes on from a whole line."""
    records, good = read_json_lines(path)
    os.truncate(path, good)
    return records


def read_json_lines(path: Path) -> tuple[list[dict], int]:
    """The records of a JSON Lines file written and flushed line by line, up to a line a crash tore (it, and
    anything after it, left out), and how many bytes the whole lines before it take."""
    records, good = [], 0
    with open(path, "rb") as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except ValueError:
                break
            good += len(line)
    return records, good
