"""The device and dtype the runner picks on this machine, the torch build, and what
torch.compile's GPU backend (Triton) needs to build its launchers."""

import shutil
import subprocess
import sysconfig
from pathlib import Path
from typing import Dict, Iterator, Union

import torch

from llama.distributed import resolve_device, resolve_dtype

from .checks import Context
from .report import Row


def device_facts() -> Dict[str, object]:
    """Name, capability, memory and the versions of torch, CUDA, cuDNN and the driver."""
    facts: Dict[str, object] = {"torch": torch.__version__, "cuda": torch.version.cuda,
                                "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
                                "gpus": torch.cuda.device_count() if torch.cuda.is_available() else 0}
    if facts["gpus"]:
        props = torch.cuda.get_device_properties(0)
        facts.update(name=props.name, capability=f"{props.major}.{props.minor}", memory_bytes=props.total_memory,
                     multiprocessors=props.multi_processor_count)
    facts["driver"] = _nvidia_smi("driver_version")
    return facts


def _nvidia_smi(field: str) -> Union[str, None]:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def triton_toolchain() -> Row:
    """Triton compiles a small C launcher per kernel signature, with the system's C compiler and
    Python's headers; a bare machine may lack either, and then every compiled run fails."""
    name = "Triton toolchain"
    compiler = next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)
    header = Path(sysconfig.get_paths()["include"]) / "Python.h"
    missing = ([] if compiler else ["a C compiler (apt-get install gcc)"]) + \
        ([] if header.is_file() else [f"{header} (apt-get install python3-dev)"])
    try:
        import triton
        version = triton.__version__
    except ImportError:
        missing.append("the triton package (it comes with CUDA builds of torch)")
        version = None
    value = {"triton": version, "cc": compiler}
    if missing:  # a WARN: the compiled checks below say whether compiling really fails
        return Row(name, "WARN", value, "cc, Python.h, triton", "compile=True may not build here: missing "
                   + "; ".join(missing))
    return Row(name, "PASS", value, "cc, Python.h, triton", f"{compiler}, {header}")


def run(ctx: Context) -> Iterator[Union[Row, dict]]:
    facts = device_facts()
    yield facts
    yield Row("CUDA build of torch", "PASS" if torch.version.cuda and facts["gpus"] else "FAIL",
              {"torch": facts["torch"], "cuda": facts["cuda"], "cudnn": facts["cudnn"]}, "a CUDA build seeing a GPU",
              f"{facts['gpus']} GPU(s): {facts.get('name')}, capability {facts.get('capability')}, driver "
              f"{facts['driver']}")
    device = resolve_device("auto")
    yield Row("device picked", "PASS" if device == torch.device("cuda", 0) else "FAIL", str(device), "cuda:0",
              "resolve_device('auto'), as Llama.build(device='auto')")
    capability = torch.cuda.get_device_capability(device)
    native = _native_bf16(device)  # torch's own word, where it has one; else the capability rule
    want = torch.bfloat16 if (capability >= (8, 0) if native is None else native) else torch.float16
    dtype = resolve_dtype(None, device)
    yield Row("dtype picked", "PASS" if dtype == want else "FAIL", str(dtype).replace("torch.", ""),
              "bf16 where the GPU computes in it natively, else fp16",
              f"resolve_dtype(None) on capability {capability[0]}.{capability[1]}; "
              f"torch.cuda.is_bf16_supported(including_emulation=False) = {native}")
    yield triton_toolchain()


def _native_bf16(device: torch.device) -> object:
    try:
        with torch.cuda.device(device):
            return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # an older torch without the argument
        return None
