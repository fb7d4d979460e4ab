"""The checker's rows, the table printed at the end and the JSON written beside it."""

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

STATUSES = ("PASS", "FAIL", "WARN", "SKIP")


@dataclass
class Row:
    """One result: what was checked (name), how it came out, the figure(s) measured, the bar they
    were held to and a one-line detail. check: the check (child process) it came from."""

    name: str
    status: str
    value: Any = None
    threshold: str = ""
    detail: str = ""
    check: str = ""

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"row {self.name!r}: status {self.status!r} is not one of {STATUSES}")

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "Row":
        return cls(d["name"], d["status"], d.get("value"), d.get("threshold") or "", d.get("detail") or "",
                   d.get("check") or "")


def status_at_least(value: float, passes: float, warns: Optional[float] = None) -> str:
    """PASS at `passes` or above, WARN down to `warns` (when given), FAIL below."""
    if value >= passes:
        return "PASS"
    return "WARN" if warns is not None and value >= warns else "FAIL"


def format_value(value: Any) -> str:
    """A figure as the table shows it: floats to 4 significant digits, dicts as k=v pairs."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={format_value(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    return str(value)


def table(rows: List[Row], detail_width: int = 100) -> str:
    header = ["check", "status", "value", "threshold", "detail"]
    lines = [[r.name, r.status, format_value(r.value), r.threshold, _cut(r.detail, detail_width)] for r in rows]
    widths = [max(len(line[i]) for line in [header] + lines) for i in range(len(header))]
    out = [" | ".join(h.ljust(w) for h, w in zip(header, widths)), "-+-".join("-" * w for w in widths)]
    out += [" | ".join(c.ljust(w) for c, w in zip(line, widths)) for line in lines]
    return "\n".join(out)


def _cut(text: str, width: int) -> str:
    text = " ".join(str(text).split())  # one line
    return text if len(text) <= width else text[:width - 3] + "..."


def summary(rows: List[Row]) -> Dict[str, int]:
    return {s: sum(r.status == s for r in rows) for s in STATUSES}


def write_json(path: Path, rows: List[Row], device: Dict[str, Any], **extra: Any) -> None:
    """All rows and the device's description; extra: run-level facts (dry_run, seconds, ...)."""
    doc = {"device": device, "summary": summary(rows), **extra, "rows": [asdict(r) for r in rows]}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(doc, indent=2, default=str) + "\n")
