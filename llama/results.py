"""Saving completions as JSON, for scripts that compare runs (e.g. 1 rank against 2)."""

import json
from pathlib import Path
from typing import Any, Sequence


def save_results(path: str, inputs: Sequence[Any], results: Sequence[dict]) -> None:
    records = [{"input": item, **result} for item, result in zip(inputs, results)]
    Path(path).write_text(json.dumps(records, indent=2, ensure_ascii=False))
