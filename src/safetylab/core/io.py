"""Atomic file writes (bytes, text, figures) and strict JSONL reading."""

from __future__ import annotations

import io
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetylab.core.errors import SafetylabError

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def save_figure(fig: Figure, path: str | os.PathLike) -> Path:
    """Render a matplotlib ``Figure`` with the Agg backend (no pyplot, no global backend switch) in the
    format named by the file's suffix (PNG when there is none) and write it atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    path = Path(path)
    buffer = io.BytesIO()
    FigureCanvasAgg(fig)
    fig.savefig(buffer, format=path.suffix.lstrip(".") or "png", dpi=100)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def dumps_line(record: dict[str, Any]) -> str:
    """One JSON object on one line, keys in insertion order, no NaN (it is not JSON)."""
    return json.dumps(record, ensure_ascii=False, allow_nan=False)


def write_jsonl(path: str | os.PathLike, records: Iterable[dict[str, Any]]) -> int:
    """Write records atomically, one JSON object per line; returns how many were written."""
    lines = [dumps_line(r) for r in records]
    atomic_write_text(path, "".join(line + "\n" for line in lines))
    return len(lines)


def read_jsonl(path: str | os.PathLike, required: Iterable[str] = ()) -> Iterator[dict[str, Any]]:
    """Yield the JSON objects of a JSONL file, failing on the first bad line with its number.

    Blank lines are errors too: a JSONL file with a hole in it is usually a truncated write.
    ``required`` names keys every object must hold, with string values.
    """
    path = Path(path)
    if not path.is_file():
        raise SafetylabError(f"{path}: no such file (expected a JSONL file)")
    required = tuple(required)
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            where = f"{path}, line {number}"
            if not line.strip():
                raise SafetylabError(f"{where}: empty line (expected one JSON object per line)")
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise SafetylabError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(record, dict):
                raise SafetylabError(f"{where}: expected a JSON object, got {type(record).__name__}")
            for key in required:
                if not isinstance(record.get(key), str):
                    raise SafetylabError(f"{where}: expected a string field {key!r}")
            yield record
