"""predict's answers as the user reads them: a table on the terminal, a CSV or a JSON file.

File names come from the user's folders and may hold any bytes. Both files are UTF-8 and hold
each name as text, its bytes that are not UTF-8 written as `\\xNN`. The JSON file holds that text
exactly (JSON escapes control characters). The CSV file and the table show it through
`errors.printable` (newlines, escape sequences and other controls as backslash escapes), so that
no name can break a row or drive a terminal that shows the file; and a relative name that a
spreadsheet would read as a formula (it begins with = + - or @) is written as `./name`, the same file.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any

from cifar100.errors import printable


def file_text(path: Path) -> str:
    """A file name as CSV and JSON hold it: UTF-8 text, each byte that is not UTF-8 as `\\xNN`."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def to_json(result: dict[str, Any]) -> str:
    """The whole result (`predict.predict`'s), indented."""
    return json.dumps(result, indent=2) + "\n"


def to_csv(result: dict[str, Any]) -> str:
    """One row per image: file, superclass and its probability, then class and probability for each of the top k."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    ks = range(1, result["topk"] + 1)
    writer.writerow(
        ["file", "superclass", "superclass_probability", *[f"{w}_{k}" for k in ks for w in ("class", "probability")]]
    )
    for row in result["predictions"]:
        tops = [value for t in row["top"] for value in (t["class"], f"{t['probability']:.6f}")]
        superclass = [row["superclass"]["name"], f"{row['superclass']['probability']:.6f}"]
        writer.writerow([_csv_name(row["file"]), *superclass, *tops])
    return text.getvalue()


def to_table(result: dict[str, Any]) -> str:
    """The terminal's table: file, superclass, then the top k classes, each with its probability."""
    rows = [
        (
            printable(r["file"]),
            (printable(r["superclass"]["name"]), r["superclass"]["probability"]),
            [(printable(t["class"]), t["probability"]) for t in r["top"]],
        )
        for r in result["predictions"]
    ]
    file_width = max(len("file"), *(len(file) for file, _, _ in rows))
    super_width = max(len(name) for _, (name, _), _ in rows)
    class_width = max(len(name) for _, _, tops in rows for name, _ in tops)
    head = [f"{'file':<{file_width}}", f"{'superclass':<{super_width + 7}}"]
    head += [f"{f'top-{k}':<{class_width + 7}}" for k in range(1, result["topk"] + 1)]
    lines = ["  ".join(head).rstrip()]
    for file, superclass, tops in rows:
        cells = [f"{file:<{file_width}}", _cell(*superclass, super_width)]
        cells += [_cell(*top, class_width) for top in tops]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _csv_name(name: str) -> str:
    shown = printable(name)
    return f"./{shown}" if shown.startswith(("=", "+", "-", "@")) else shown


def _cell(name: str, probability: float, width: int) -> str:
    return f"{name:<{width}} {probability:>6.1%}"
