"""The GPU check: every CUDA path of the runner checked and timed in one command, each check in a
child process under its own time limit, a PASS / FAIL / WARN / SKIP table at the end and the same
rows in JSON. Without a GPU (or with --dry-run) it lists what it would check and exits 0.

    PYTHONPATH=benchmarks python -m gpu_check [--out gpu_check.json] [--dry-run] [--budget SECONDS]
        [--only device,numerics,...] [--per-check SECONDS]

(bash scripts/gpu_check.sh sets up the environment first, then runs this.) Logs of each check go
to a folder beside the JSON (gpu_check_logs/ for gpu_check.json). Exit code: 1 when a row FAILed.
"""

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

from .checks import CHECKS, Check, Context
from .report import Row, summary, table, write_json
from .runner import child_main, run_check

REPO = Path(__file__).resolve().parents[2]
MIN_SECONDS = 20  # a check is not started with less time than this left in the budget


def gpus_visible() -> Dict[str, object]:
    """What torch sees, without touching a GPU beyond counting them, and what nvidia-smi lists."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return {"torch": torch.__version__, "cuda": torch.version.cuda, "gpus": count, "nvidia_smi_gpus": nvidia_smi_gpus()}


def nvidia_smi_gpus() -> int:
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(line.startswith("GPU ") for line in out.stdout.splitlines()) if out.returncode == 0 else 0


def dry_run(checks: List[Check], out: Path, facts: Dict[str, object], reason: str, **extra) -> int:
    """Lists the checks, writes them as SKIP rows; exit code 0."""
    print(f"{reason}: dry run, nothing is measured. On a GPU it would check:")
    for check in checks:
        needs = f", needs {check.gpus} GPUs" if check.gpus > 1 else ""
        print(f"  {check.name} (up to {check.budget} s{needs}): {check.about}")
        for name in check.rows:
            print(f"    - {name}")
    rows = [Row(name, "SKIP", detail="dry run", check=check.name) for check in checks for name in check.rows]
    write_json(out, rows, facts, dry_run=True, reason=reason, **extra)
    print(table(rows))
    print(f"wrote {out}")
    return 0


def prepare(workdir: Path, gpus: int) -> None:
    """The small checkpoint the checks load (CPU work, before any check); as 2 shards too where
    the 2-rank check will run."""
    from .models import write_tiny_checkpoint

    for shards in (1, 2) if gpus >= 2 else (1,):
        write_tiny_checkpoint(workdir / f"tiny-mp{shards}", shards)


def run_all(checks: List[Check], out: Path, facts: Dict[str, object], budget: float,
            prepare_workdir: Callable[[Path, int], None] = prepare, per_check: Optional[float] = None,
            **extra) -> int:
    """Runs the checks one after another within `budget` seconds, each for at most its own limit
    (or per_check seconds); writes the JSON after each."""
    start = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    try:
        rows = _run_checks(checks, out, facts, budget, workdir, prepare_workdir, start, per_check, extra)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print()
    print(table(rows))
    counts = summary(rows)
    print(", ".join(f"{s} {n}" for s, n in counts.items()) + f"; wrote {out} (logs in {_log_dir(out)})")
    return 1 if counts["FAIL"] else 0


def _log_dir(out: Path) -> Path:
    return out.parent / f"{out.stem}_logs"


def _run_checks(checks, out, facts, budget, workdir, prepare_workdir, start, per_check, extra) -> List[Row]:
    rows: List[Row] = []
    try:
        prepare_workdir(workdir, facts["gpus"])
    except Exception as e:  # noqa: BLE001  the checks that need the checkpoints then fail on their own
        print(f"could not write the small checkpoints: {type(e).__name__}: {e}")
    for check in checks:
        left = budget - (time.monotonic() - start)
        limit = min(per_check or check.budget, left)
        if check.gpus > facts["gpus"]:
            found = [Row(n, "SKIP", detail=f"needs {check.gpus} GPUs; this machine shows {facts['gpus']}",
                         check=check.name) for n in check.rows]
        elif left < MIN_SECONDS:
            found = [Row(n, "SKIP", detail=f"out of time: {left:.0f} s of the {budget:.0f} s budget left",
                         check=check.name) for n in check.rows]
        else:
            began = time.monotonic()
            print(f"[{check.name}] up to {limit:.0f} s ...", flush=True)
            found, info = run_check(check, Context(workdir, _log_dir(out), limit, REPO))
            facts.update(info)
            print(f"[{check.name}] {time.monotonic() - began:.0f} s: " +
                  ", ".join(f"{r.name} {r.status}" for r in found), flush=True)
        rows += found
        write_json(out, rows, facts, dry_run=False, seconds=time.monotonic() - start, **extra)  # kept if killed
    return rows


def main(argv: List[str] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="gpu_check.json", help="the JSON to write (default gpu_check.json)")
    parser.add_argument("--dry-run", action="store_true", help="list the checks and write SKIP rows, run nothing")
    parser.add_argument("--budget", type=float, default=420, help="seconds for all checks together (default 420)")
    parser.add_argument("--only", default="", help="comma-separated check names to run (default all)")
    parser.add_argument("--per-check", type=float, default=None,
                        help="seconds each check may run (default: its own limit, listed by --dry-run)")
    parser.add_argument("--setup-seconds", type=float, default=None, help="how long setup took (for the JSON)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--rows", help=argparse.SUPPRESS)
    parser.add_argument("--context", help=argparse.SUPPRESS)
    parser.add_argument("--check", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child_main(args.child, args.rows, args.context, args.check)
        return 0
    names = [n for n in args.only.split(",") if n]
    unknown = sorted(set(names) - {c.name for c in CHECKS})
    if unknown:
        parser.error(f"unknown check(s) {unknown}; choose from {', '.join(c.name for c in CHECKS)}")
    checks = [c for c in CHECKS if not names or c.name in names]
    out = Path(args.out).resolve()
    facts = gpus_visible()
    extra = {"setup_seconds": args.setup_seconds, "budget_seconds": args.budget, "argv": sys.argv[1:]}
    build = "a CPU build of torch" if facts["cuda"] is None else f"torch built for CUDA {facts['cuda']}"
    if not facts["gpus"] and facts["nvidia_smi_gpus"]:  # a GPU torch cannot use: a setup failure, not a dry run
        row = Row("CUDA build of torch", "FAIL", facts, "torch sees the GPUs nvidia-smi lists",
                  f"nvidia-smi lists {facts['nvidia_smi_gpus']} GPU(s) but torch sees none ({build}): reinstall "
                  f"torch's CUDA build (bash scripts/setup.sh test) or check the driver", check="device")
        write_json(out, [row], facts, dry_run=False, gpu_found=False, **extra)
        print(table([row]))
        return 1
    if not facts["gpus"]:
        return dry_run(checks, out, facts, f"no CUDA GPU found ({build}, torch.cuda.is_available() is False)",
                       gpu_found=False, **extra)
    if args.dry_run:
        return dry_run(checks, out, facts, "--dry-run asked for", gpu_found=True, **extra)
    return run_all(checks, out, facts, args.budget, per_check=args.per_check, gpu_found=True, **extra)


if __name__ == "__main__":
    sys.exit(main())
