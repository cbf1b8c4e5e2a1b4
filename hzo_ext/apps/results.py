"""Result files of the benchmarks, studies and training runs: the one CSV writer they share."""
from __future__ import annotations

import csv
from pathlib import Path


def write_csv(path, rows: list[dict], comment: str | None = None, float_format: str | None = None) -> Path:
    """Write ``rows`` (dicts with the same keys, in column order) to ``path``, making its folder.

    ``comment``: a first line ``# comment`` (the command that made the file, the machine).
    ``float_format``: format spec for float values (e.g. ``".6g"``); else they are written as is.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        if comment is not None:
            f.write(f"# {comment}\n")
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: format(v, float_format) if float_format and isinstance(v, float) else v
                             for k, v in row.items()})
    return path
