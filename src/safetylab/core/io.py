"""Atomic file writes (bytes, text, figures) and strict JSONL reading."""

from __future__ import annotations

import io
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

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


def read_json(path: str | os.PathLike) -> Any:
    """The JSON document in the file ``path``; invalid JSON is a :class:`SafetylabError` naming the file, what
    is wrong and the line."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise SafetylabError(f"{path}: invalid JSON ({e.msg}, line {e.lineno})") from None


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


class JsonlLine(NamedTuple):
    """One line of a JSONL file: its number, and its JSON object or, for a bad line, the ``problem``."""

    number: int
    record: dict[str, Any] | None
    problem: str | None = None


def jsonl_lines(path: str | os.PathLike, required: Iterable[str] = ()) -> Iterator[JsonlLine]:
    """Every line of a JSONL file, good or bad, so that a caller can report all the bad ones.

    Blank lines at the end of the file are ignored (editors add them); a blank line with data after it
    is bad: a JSONL file with a hole in it is usually a damaged or concatenated write. ``required``
    names keys every object must hold, with string values.
    """
    path = Path(path)
    if not path.is_file():
        raise SafetylabError(f"{path}: no such file (expected a JSONL file)")
    required = tuple(required)
    blank: list[int] = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                blank.append(number)
                continue
            for hole in blank:
                yield JsonlLine(hole, None, "empty line (expected one JSON object per line)")
            blank = []
            yield _parse_line(number, line, required)


def _parse_line(number: int, line: str, required: tuple[str, ...]) -> JsonlLine:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        return JsonlLine(number, None, f"malformed JSON ({e.msg} at column {e.colno})")
    if not isinstance(record, dict):
        return JsonlLine(number, None, f"expected a JSON object, got {type(record).__name__}")
    missing = [key for key in required if not isinstance(record.get(key), str)]
    if missing:
        return JsonlLine(number, None, f"expected a string field {missing[0]!r}")
    return JsonlLine(number, record)


def read_jsonl(path: str | os.PathLike, required: Iterable[str] = ()) -> Iterator[dict[str, Any]]:
    """Yield the JSON objects of a JSONL file, failing on the first bad line with its number
    (see :func:`jsonl_lines` for what is bad)."""
    for line in jsonl_lines(path, required):
        if line.problem is not None:
            raise SafetylabError(f"{path}, line {line.number}: {line.problem}")
        yield line.record


def bad_lines_error(path: str | os.PathLike, bad: list[tuple[int, str]], total: int) -> SafetylabError:
    """One error that names every bad line of a file (the first ten with their problem)."""
    shown = "; ".join(f"line {number}: {problem}" for number, problem in bad[:10])
    rest = f"; and lines {', '.join(str(number) for number, _ in bad[10:])}" if len(bad) > 10 else ""
    return SafetylabError(f"{path}: {len(bad)} bad line{'s' if len(bad) > 1 else ''} of {total} ({shown}{rest}); "
                          "nothing was written")
