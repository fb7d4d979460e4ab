"""What the checker checks: each check runs in a child process of its own, under its own time
limit, and reports the rows named here (the dry run lists them)."""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Tuple


@dataclass(frozen=True)
class Check:
    name: str
    module: str  # a module (or module:function) whose run(ctx) yields the check's Rows
    rows: Tuple[str, ...]
    budget: int  # seconds the child may run before it is killed
    about: str
    gpus: int = 1  # GPUs it needs; with fewer it is SKIPped


PACKAGE = "gpu_check"  # imported with benchmarks/ on sys.path (fairscale ships a package named benchmarks)

CHECKS = (
    Check("device", f"{PACKAGE}.device",
          ("CUDA build of torch", "device picked", "dtype picked", "Triton toolchain"), 60,
          "the device and dtype Llama.build picks (auto), the torch build, what torch.compile needs"),
    Check("numerics", f"{PACKAGE}.numerics", ("fp32 greedy, CUDA = CPU", "bf16 logits vs fp32"), 90,
          "a small random checkpoint: CUDA fp32 greedy tokens equal CPU fp32; bf16 logits near fp32 "
          "(teacher-forced)"),
    Check("sdpa", f"{PACKAGE}.sdpa",
          ("SDPA kernel, prefill", "SDPA kernel, decode (eager)", "SDPA kernel, decode (compiled)"), 90,
          "which attention kernel the profiler sees at the 8B attention shape in bf16: flash, "
          "memory-efficient or cuDNN, not math"),
    Check("compiled", f"{PACKAGE}.compiled",
          ("compiled = eager (CUDA graphs)", "CUDA graph replays", "syncs per decode step (eager)",
           "syncs per decode step (compiled)"), 150,
          "compile=True greedy tokens equal eager across a key bucket, graphs replayed every step, "
          "host-device syncs per step"),
    Check("speed", f"{PACKAGE}.speed",
          ("HBM read bandwidth", "decode 8B bf16 batch 1", "prefill 8B bf16 2048 tokens", "decode 8B bf16 batch 8"),
          270,
          "Llama-3.1-8B shape, random bf16 weights made on the GPU, compiled decode at batch 1 and 8 "
          "against the HBM read bandwidth measured here (target >= 80%), prefill tok/s"),
    Check("ranks", f"{PACKAGE}.ranks", ("2 ranks NCCL = 1 rank", "2 ranks exit with compile"), 180,
          "torchrun, 2 ranks over NCCL with compile on: greedy outputs equal 1 rank's, clean exit", gpus=2),
)


@dataclass
class Context:
    """What a check's child process gets: the shared work folder (the small checkpoints the parent
    wrote), the folder for logs (beside the JSON), its own time limit, and the repository."""

    workdir: Path
    log_dir: Path
    timeout: float
    repo: Path

    def tiny_checkpoint(self, shards: int = 1) -> Path:
        return self.workdir / f"tiny-mp{shards}"

    @property
    def tokenizer(self) -> Path:
        return self.tiny_checkpoint(1) / "tokenizer.model"

    def to_json(self) -> str:
        return json.dumps({"workdir": str(self.workdir), "log_dir": str(self.log_dir), "timeout": self.timeout,
                           "repo": str(self.repo)})

    @classmethod
    def from_json(cls, text: str) -> "Context":
        d = json.loads(text)
        return cls(Path(d["workdir"]), Path(d["log_dir"]), float(d["timeout"]), Path(d["repo"]))
