"""Two ranks over NCCL (torchrun, one GPU each) with compile on: greedy outputs equal one rank's,
and the ranks exit by themselves (destroy_process_group can hang after NCCL work was captured in
a CUDA graph, pytorch#115388). Both runs are example_text_completion.py on the small checkpoint
saved as 2 shards, each under its own time limit, killed with everything it started past it."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Iterator, List

from .checks import Context
from .numerics import guarded
from .report import Row

EXIT_LAG_LIMIT = 30.0  # seconds from the results being written to the last process gone


def launch(cmd: List[str], output: Path, log: Path, timeout: float, cwd: Path) -> Dict[str, object]:
    """Runs cmd in a session of its own; returns its exit code (None if killed at the timeout),
    its seconds, and how long it took to exit after writing `output`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=cwd, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = None
        finally:  # also on SIGTERM from the parent: nothing of this launch may outlive it
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()
    seconds, ended = time.monotonic() - start, time.time()
    lag = ended - output.stat().st_mtime if rc is not None and output.is_file() else None
    return {"rc": rc, "seconds": seconds, "exit_lag_s": lag}


def generations(path: Path) -> List[str]:
    return [record["generation"] for record in json.loads(path.read_text())]


def equal_row(name: str, one: Path, two: Path) -> Row:
    want, got = generations(one), generations(two)
    differ = [i for i, (a, b) in enumerate(zip(want, got)) if a != b]
    if differ or len(want) != len(got):
        i = differ[0] if differ else min(len(want), len(got))
        return Row(name, "FAIL", {"prompts": len(want), "differ": len(differ)}, "all greedy outputs equal",
                   f"prompt {i}: 1 rank {want[i][:60]!r}... against 2 ranks {got[i][:60]!r}..." if differ else
                   f"{len(want)} outputs against {len(got)}")
    return Row(name, "PASS", {"prompts": len(want), "differ": 0}, "all greedy outputs equal",
               "example_text_completion.py --compile, fp32, 1 rank against torchrun --nproc_per_node 2 (NCCL)")


def exit_row(name: str, run: Dict[str, object], timeout: float) -> Row:
    value = {k: run[k] for k in ("rc", "seconds", "exit_lag_s")}
    threshold = f"exit code 0 within {timeout:.0f} s, gone {EXIT_LAG_LIMIT:.0f} s after the results"
    if run["rc"] is None:
        return Row(name, "FAIL", value, threshold, f"killed after {timeout:.0f} s (a hang: in NCCL, or at exit)")
    if run["rc"] != 0:
        return Row(name, "FAIL", value, threshold, f"torchrun exited with code {run['rc']}")
    lag = run["exit_lag_s"]
    status = "PASS" if lag is not None and lag <= EXIT_LAG_LIMIT else "WARN"
    return Row(name, status, value, threshold, "the ranks exited by themselves" if status == "PASS" else
               "exited, but slowly after writing the results")


def run(ctx: Context) -> Iterator[Row]:
    ckpt = ctx.tiny_checkpoint(2)
    example = str(ctx.repo / "example_text_completion.py")
    args = ["--ckpt_dir", str(ckpt), "--tokenizer_path", str(ckpt / "tokenizer.model"), "--device", "cuda",
            "--dtype", "fp32", "--temperature", "0", "--max_gen_len", "32", "--compile"]
    logs = ctx.log_dir
    deadline = time.monotonic() + ctx.timeout - 10  # 10 s kept for the rows
    one, two = logs / "ranks-1.json", logs / "ranks-2.json"
    # The single rank gets 40% of the time; the two ranks (which compile too, then meet) the rest.
    single = launch([sys.executable, example, *args, "--output_json", str(one)], one, logs / "ranks-1.log",
                    max(30.0, 0.4 * (deadline - time.monotonic())), ctx.repo)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", example]
    limit = max(30.0, deadline - time.monotonic())
    double = launch([*torchrun, *args, "--output_json", str(two)], two, logs / "ranks-2.log", limit, ctx.repo)
    name = "2 ranks NCCL = 1 rank"
    failed = [(n, run) for n, run in (("1-rank", single), ("2-rank", double)) if run["rc"] != 0]
    if failed:
        n, run = failed[0]
        yield Row(name, "FAIL", run, "all greedy outputs equal", f"the {n} run failed; see {logs / f'ranks-{n[0]}.log'}")
    else:
        yield guarded(name, lambda: equal_row(name, one, two))
    yield exit_row("2 ranks exit with compile", double, limit)
