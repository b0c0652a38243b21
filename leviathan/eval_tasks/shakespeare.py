"""The datasets of the lm-evaluation-harness tasks in this folder, read from the JSON files
beside this one: they run offline (`lm_eval --include_path` this folder, docs/export.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def load(data_file: str, **_: Any) -> dict[str, Any]:
    """{"test": the rows of `data_file`}, as a task's `custom_dataset` returns them (the
    task's metadata arrives as further keywords, unused)."""
    import datasets

    rows = json.loads((Path(__file__).parent / data_file).read_text(encoding="utf-8"))
    return {"test": datasets.Dataset.from_list(rows)}
