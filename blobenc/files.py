"""Files written whole or not at all, and JSON read with one-line errors: the one home for both."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

from blobenc.errors import BlobencError, ConfigError


@contextlib.contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """A temporary name beside `path` to write to, renamed over `path` when the block ends and
    removed when it raises: a reader (or a crash) never sees half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        yield tmp
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path | str, obj) -> None:
    """`obj` as indented JSON, written atomically (its folder made if needed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")


def read_json(path: Path | str, error: type[BlobencError] = ConfigError):
    """A JSON file; missing or invalid, one `error` line naming it."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: file not found")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise error(f"{path}: not valid JSON ({e})") from None
