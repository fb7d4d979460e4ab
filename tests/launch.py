"""Launching the example scripts on several ranks for the tests (torchrun on one "node" or two),
and finding the processes a launch left behind."""

import os
import socket
import sys
import time
import uuid
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parent.parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
FAULTY = "tests/fault_injection.py"  # runs a script or module with the fault LLAMA_TEST_FAULT asks for


def torchrun(script: str, *args: str, ranks: int = 2) -> List[str]:
    """One node with `ranks` processes."""
    return TORCHRUN + ["--standalone", "--nproc_per_node", str(ranks), script, *args]


def torchrun_node(node_rank: int, port: int, script: str, *args: str) -> List[str]:
    """One of two "nodes" (both on this machine), one process each, meeting at 127.0.0.1:port."""
    return TORCHRUN + ["--nnodes", "2", "--node_rank", str(node_rank), "--nproc_per_node", "1",
                       "--master_addr", "127.0.0.1", "--master_port", str(port), script, *args]


def example_args(ckpt: Path, *extra: str) -> List[str]:
    return ["--ckpt_dir", str(ckpt), "--tokenizer_path", str(ckpt / "tokenizer.model"),
            "--device", "cpu", "--dtype", "fp32", *extra]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tagged_env(**extra: str) -> Dict[str, str]:
    """The environment for a launch, tagged so that processes_tagged() finds all it started."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8",
            "LLAMA_TEST_TAG": uuid.uuid4().hex, **extra}


def processes_tagged(env: Dict[str, str]) -> List[str]:
    """Live processes (pid and command line) started with this environment's tag: launchers and
    ranks inherit it."""
    needle = f"LLAMA_TEST_TAG={env['LLAMA_TEST_TAG']}".encode()
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if needle in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                state = _state(pid)
                if state not in (None, "Z"):  # a zombie has ended; only its parent has not reaped it
                    command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
                    found.append(f"{pid}: {command}")
        except OSError:
            continue
    return found


def _state(pid: str) -> Optional[str]:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def assert_nothing_left(env: Dict[str, str], grace: float = 30) -> None:
    """No process of this launch is alive, allowing `grace` seconds for ones being torn down (the
    launcher may return before its ranks are gone, and a busy machine takes its time)."""
    deadline = time.monotonic() + grace
    while processes_tagged(env) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert processes_tagged(env) == []
