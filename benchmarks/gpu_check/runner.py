"""Running each check in a child process under a time limit, so that a check that crashes,
hangs (an NCCL collective, an exit that never comes) or poisons its CUDA context cannot stop the
others. The child appends what it finds to a JSON-lines file as it goes, so whatever it reported
before it was killed is kept."""

import importlib
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, List, Tuple

from .checks import PACKAGE, Check, Context
from .report import Row

EXIT_GRACE = 30.0  # seconds a child may take to exit once it has reported everything
KILL_GRACE = 5.0  # between SIGTERM (the child cleans up its own children) and SIGKILL


def run_check(check: Check, ctx: Context, python: str = sys.executable) -> Tuple[List[Row], Dict]:
    """Runs one check in a child process, for at most ctx.timeout seconds. Returns its rows (every
    row the check names: one it did not report is a FAIL saying why, and the rows after it SKIPs)
    and the device facts it reported. The child's output goes to ctx.log_dir/NAME.log."""
    log_dir = ctx.log_dir
    log_dir.mkdir(parents=True, exist_ok=True)
    rows_path, log_path = log_dir / f"{check.name}.jsonl", log_dir / f"{check.name}.log"
    rows_path.unlink(missing_ok=True)
    cmd = [python, "-m", PACKAGE, "--child", check.module, "--rows", str(rows_path), "--context", ctx.to_json(),
           "--check", check.name]
    start = time.monotonic()
    with open(log_path, "w") as log:
        # A session of its own: killing its group also ends what it started (torchrun, ranks).
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ctx.repo, env=child_env(ctx.repo),
                                start_new_session=True)
        ended, exit_hung = _wait(proc, rows_path, start + ctx.timeout)
        _signal_group(proc, signal.SIGKILL)  # anything it left behind would hold the GPU for the next check
    rows, info, error = read_rows(rows_path, check.name)
    reason = None
    if not ended:
        reason = f"exit hung: still running {EXIT_GRACE:.0f} s after its last row" if exit_hung else \
            f"timed out: still running at its limit of {ctx.timeout:.0f} s"
    elif error:
        reason = error
    elif proc.returncode != 0:
        reason = f"its process exited with code {proc.returncode}"
    return _complete(check, rows, reason, _tail(log_path)), info


def child_env(repo: Path) -> Dict[str, str]:
    """The environment of a check's process: this package and the repository importable."""
    path = os.pathsep.join([str(repo / "benchmarks"), str(repo), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path.rstrip(os.pathsep), "PYTHONUNBUFFERED": "1"}


def _wait(proc: subprocess.Popen, rows_path: Path, deadline: float) -> Tuple[bool, bool]:
    """(ended by itself, killed after reporting everything)."""
    done_at = None
    while proc.poll() is None:
        now = time.monotonic()
        if done_at is None and _reported_done(rows_path):
            done_at = now
            deadline = min(deadline, now + EXIT_GRACE)
        if now >= deadline:
            _kill_group(proc)
            return False, done_at is not None
        time.sleep(0.2)
    return True, False


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the child's process group (the child then ends what it started), SIGKILL to
    whatever is left of it a few seconds later."""
    _signal_group(proc, signal.SIGTERM)
    try:
        proc.wait(timeout=KILL_GRACE)
    except subprocess.TimeoutExpired:
        pass
    _signal_group(proc, signal.SIGKILL)
    proc.wait()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):  # the whole group has ended
        pass


def _reported_done(rows_path: Path) -> bool:
    try:
        with open(rows_path, "rb") as f:
            f.seek(max(0, rows_path.stat().st_size - 200))
            return b'"done": true' in f.read()
    except OSError:
        return False


def read_rows(rows_path: Path, check: str) -> Tuple[List[Row], Dict[str, Any], str]:
    """The rows, device facts and error (or "") a child wrote."""
    rows, info, error = [], {}, ""
    try:
        lines = rows_path.read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        try:
            item = json.loads(line)
        except json.JSONDecodeError:  # a line cut off by a kill
            continue
        if "row" in item:
            rows.append(Row.from_dict({**item["row"], "check": check}))
        info.update(item.get("info", {}))
        error = item.get("error", error)
    return rows, info, error


def _complete(check: Check, rows: List[Row], reason: str, log_tail: str) -> List[Row]:
    """Every row the check names, in its order: the first it did not report fails with `reason`."""
    by_name = {r.name: r for r in rows}
    out, failed = [], False
    for name in check.rows:
        if name in by_name:
            out.append(by_name.pop(name))
        elif not failed:
            failed = True
            why = reason or "the check ended without reporting it"
            out.append(Row(name, "FAIL", detail=f"{why}; log: {log_tail}", check=check.name))
        else:
            out.append(Row(name, "SKIP", detail=f"not reached ({reason or 'an earlier row failed'})",
                           check=check.name))
    out += list(by_name.values())  # rows the check reported under names it does not declare
    if reason and not failed:  # everything reported, but the process did not end well
        out.append(Row(f"{check.name}: process", "FAIL", detail=f"{reason}; log: {log_tail}", check=check.name))
    return out


def _tail(path: Path, lines: int = 3, width: int = 400) -> str:
    try:
        text = " / ".join(line.strip() for line in path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
    return text[-width:]


def child_main(spec: str, rows_path: str, context: str, check: str) -> None:
    """In the child: runs the check's run(ctx) and writes each Row (or dict of device facts) it
    yields as one JSON line, then a final {"done": true}. An exception becomes {"error": ...}, which
    the parent turns into a FAIL of the row the check had reached."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so `finally` blocks end grandchildren
    module, _, function = spec.partition(":")
    with open(rows_path, "a") as out:
        def write(item: Dict[str, Any]) -> None:
            out.write(json.dumps(item, default=str) + "\n")
            out.flush()

        try:
            run = getattr(importlib.import_module(module), function or "run")
            for item in run(Context.from_json(context)):
                write({"row": {**asdict(item), "check": check}} if isinstance(item, Row) else {"info": item})
        except Exception as e:  # noqa: BLE001  reported as a FAIL row, not a crash
            traceback.print_exc()
            write({"error": f"{type(e).__name__}: {e}"})
        write({"done": True})
