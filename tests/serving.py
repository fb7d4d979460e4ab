"""Starting the real server (python -m llama.serve, or under torchrun) for the tests, and talking to it."""

import re
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import List, Optional

from .launch import FAULTY, REPO, assert_nothing_left, processes_tagged, tagged_env, torchrun

READY = re.compile(r"Serving \S+ at (http://127\.0\.0\.1:\d+/v1) \(ready\)")
START = 180  # seconds to start and load, on a busy 2-core machine
STOP = 90  # seconds to wait for every rank to exit after SIGTERM (it takes ~5-10; catches a hang)


class Server:
    """One server on `ranks` CPU processes, listening on a free loopback port."""

    def __init__(self, ckpt: Path, ranks: int = 1, *extra: str, tokenizer: str = "tokenizer.model",
                 compile: Optional[bool] = False, **env: str):
        """compile: False (--nocompile, the tests' default: compiling costs ~45 s a batch size on a
        2-core machine), True (--compile) or None (no flag: the server's own default)."""
        flag = {False: ["--nocompile"], True: ["--compile"], None: []}[compile]
        args = ["--ckpt_dir", str(ckpt), "--tokenizer_path", str(ckpt / tokenizer), "--device", "cpu",
                "--dtype", "fp32", "--port", "0", *flag, *extra]
        program = ["-m", "llama.serve"]
        if "LLAMA_TEST_FAULT" in env:
            program = [FAULTY, *program]  # which puts the fault in
        command = [sys.executable, *program, *args] if ranks == 1 else torchrun(*program, *args, ranks=ranks)
        self.env = tagged_env(**env)
        self.proc = subprocess.Popen(command, cwd=REPO, env=self.env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self.lines: List[str] = []
        self._ready = threading.Event()
        self.url: Optional[str] = None
        threading.Thread(target=self._read, daemon=True).start()
        if not self._ready.wait(START) or self.url is None:
            self.kill()
            raise AssertionError(f"the server did not start:\n{self.output}")

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            match = READY.search(line)
            if match:
                self.url = match.group(1)
                self._ready.set()
        self._ready.set()  # the output ended: the process has exited

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
