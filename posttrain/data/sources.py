"""Where task rows come from: a local JSONL file (or a folder holding `<task>.jsonl`) or the Hub.

One reader and one field-mapping helper serve every task, so every malformed row is reported the
same way: a ValueError naming the file and the 1-based line number. Nothing is dropped silently.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

__all__ = ["resolve_jsonl", "read_jsonl", "write_jsonl", "iter_rows", "pick", "stringify_answer", "make_id"]

Row = tuple[str, int, dict[str, Any]]  # (where, 0-based row index, row)


def resolve_jsonl(path: str | Path, name: str) -> Path:
    """`path` itself when it is a file; `path/<name>.jsonl` when it is a folder."""
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / f"{name}.jsonl"
    if not p.is_file():
        raise FileNotFoundError(f"no data file for task {name!r} at {p}")
    return p


def read_jsonl(path: str | Path, limit: int | None = None) -> Iterator[Row]:
    """Yield (`"file:line"`, index, row) for each JSON object line; blank lines are skipped."""
    p = Path(path)
    index = 0
    with p.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if limit is not None and index >= limit:
                return
            if not line.strip():
                continue
            where = f"{p}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
            yield where, index, row
            index += 1


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> Path:
    """Write one JSON object per line (UTF-8, parent folders created)."""
    p = Path(path).expanduser()
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return p


def iter_rows(
    name: str,
    *,
    path: str | Path | None,
    hub_id: str | None,
    hub_config: str | None = None,
    split: str | None = None,
    limit: int | None = None,
) -> Iterator[Row]:
    """Rows of task `name` from `path` when given, else from the Hub dataset `hub_id` / `split`."""
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    if path is not None:
        yield from read_jsonl(resolve_jsonl(path, name), limit=limit)
        return
    if hub_id is None:
        raise ValueError(f"task {name!r} has no Hub source: pass path= to a JSONL file")
    import datasets

    ds = datasets.load_dataset(hub_id, hub_config, split=split)
    for i, row in enumerate(ds):
        if limit is not None and i >= limit:
            return
        yield f"{hub_id}[{split}] row {i + 1}", i, dict(row)


def pick(row: dict[str, Any], fields: Sequence[str], where: str, *, required: bool = True) -> Any:
    """The value of the first of `fields` present (and not null) in `row`."""
    for field in fields:
        if row.get(field) is not None:
            return row[field]
    if required:
        wanted = " or ".join(repr(f) for f in fields)
        raise ValueError(f"{where}: missing field {wanted} (row has {sorted(row)})")
    return None


def stringify_answer(value: Any, where: str) -> str:
    """A gold answer as a string: 27.0 -> "27", 2.5 -> "2.5", strings stripped; empty is an error."""
    if isinstance(value, bool):
        raise ValueError(f"{where}: answer must be a number or a string, got {value!r}")
    if isinstance(value, float):
        text = str(int(value)) if value.is_integer() else repr(value)
    elif isinstance(value, (int, str)):
        text = str(value).strip()
    else:
        raise ValueError(f"{where}: answer must be a number or a string, got {type(value).__name__}")
    if not text:
        raise ValueError(f"{where}: empty answer")
    return text


def make_id(name: str, raw: Any, index: int) -> str:
    """A row id prefixed by the task name ("gsm8k-12"); ids that already carry the prefix are kept."""
    text = str(index if raw is None else raw)
    return text if text.startswith(f"{name}-") else f"{name}-{text}"
