"""Starting the real server (python -m llama.serve, or under torchrun) for the tests, and talking to it."""

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

from .launch import FAULTY, REPO, assert_nothing_left, processes_tagged, tagged_env, torchrun

READY = re.compile(r"Serving \S+ at (http://127\.0\.0\.1:\d+/v1) \(ready\)")
START = 180  # seconds to start and load, on a busy 2-core machine
STOP = 90  # seconds to wait for every rank to exit after SIGTERM (it takes ~5-10; catches a hang)


class Server:
    """One server on `ranks` CPU processes, listening on a free loopback port."""

    def __init__(self, ckpt: Path, ranks: int = 1, *extra: str, tokenizer: str = "tokenizer.model",
                 compile: Optional[bool] = False, wait_ready: bool = True, session: bool = False, **env: str):
        """compile: False (--nocompile, the tests' default: compiling costs ~45 s a batch size on a
        2-core machine), True (--compile) or None (no flag: the server's own default).
        wait_ready: return once it says it is ready (else at once: see wait_for). session: start it
        in a session and process group of its own, as a terminal would, so that signal(group=True)
        reaches the launcher and every rank at once (a Ctrl-C)."""
        flag = {False: ["--nocompile"], True: ["--compile"], None: []}[compile]
        args = ["--ckpt_dir", str(ckpt), "--tokenizer_path", str(ckpt / tokenizer), "--device", "cpu",
                "--dtype", "fp32", "--port", "0", *flag, *extra]
        program = ["-m", "llama.serve"]
        if "LLAMA_TEST_FAULT" in env:
            program = [FAULTY, *program]  # which puts the fault in
        command = [sys.executable, *program, *args] if ranks == 1 else torchrun(*program, *args, ranks=ranks)
        self.env = tagged_env(**env)
        self.proc = subprocess.Popen(command, cwd=REPO, env=self.env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=session)
        self.lines: List[str] = []
        self._new_line = threading.Condition()
        self._ended = False  # the output ended: the process has exited
        self.url: Optional[str] = None
        threading.Thread(target=self._read, daemon=True).start()
        if wait_ready and (self.wait_for(READY, START) is None or self.url is None):
            self.kill()
            raise AssertionError(f"the server did not start:\n{self.output}")

    def _read(self) -> None:
        for line in self.proc.stdout:
            match = READY.search(line)
            with self._new_line:
                if match:
                    self.url = match.group(1)
                self.lines.append(line)
                self._new_line.notify_all()
        with self._new_line:
            self._ended = True
            self._new_line.notify_all()

    def wait_for(self, pattern: "re.Pattern", seconds: float) -> Optional[str]:
        """The first output line matching `pattern`, waiting up to `seconds` for it; None if the
        output ended or the time passed without one."""
        deadline = time.monotonic() + seconds
        with self._new_line:
            seen = 0
            while True:
                for line in self.lines[seen:]:
                    if pattern.search(line):
                        return line
                seen = len(self.lines)
                left = deadline - time.monotonic()
                if self._ended or left <= 0:
                    return None
                self._new_line.wait(left)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def client(self, **options):
        import openai

        return openai.OpenAI(base_url=self.url, api_key=options.pop("api_key", "none"), max_retries=0,
                             timeout=options.pop("timeout", 120), **options)

    def wait(self, seconds: float) -> Optional[int]:
        """The exit code, or None if it still runs after `seconds`."""
        try:
            return self.proc.wait(seconds)
        except subprocess.TimeoutExpired:
            return None

    def signal(self, signum: int, group: bool = False) -> None:
        """Sends a signal to the launcher (as `kill` does), or with group=True to its whole process
        group (as a terminal's Ctrl-C does: the launcher and every rank; needs session=True)."""
        if group:
            os.killpg(self.proc.pid, signum)
        else:
            self.proc.send_signal(signum)

    def stop(self) -> Optional[int]:
        """SIGTERM; returns the exit code, or None if it had to be killed."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.wait(STOP)
        if code is None:
            self.kill()
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        for line in processes_tagged(self.env):  # ranks a killed launcher left behind
            subprocess.run(["kill", "-9", line.split(":", 1)[0]], check=False)

    def assert_nothing_left(self) -> None:
        assert_nothing_left(self.env)


def tiny_checkpoints(root: Path) -> Dict[int, Path]:
    """The tests' tiny random Llama 3.1 model (conftest's llama31_ckpts) as 1 and as 2 shards, for
    the scripts in benchmarks/ that start servers outside pytest."""
    from llama.random_model import write_random_checkpoint

    from .conftest import LLAMA31_PARAMS
    from .tokenizer_files import llama3_tokenizer_path

    return {k: write_random_checkpoint(Path(root) / f"mp{k}", LLAMA31_PARAMS, llama3_tokenizer_path(), 128256, k)
            for k in (1, 2)}
