"""Our own CPU kernels for the decode step (llama/csrc/: the quantized products and one-position
attention), built once per machine with the system's C++ compiler and kept in
~/.cache/llama-runner/kernels.

They are used only where they can run: an x86 CPU with AVX-512 VNNI, a C++ compiler, and PyTorch's
headers (every PyTorch wheel ships them). Elsewhere `load()` returns the reason, and the model
runs on PyTorch's own kernels instead (llama/quantize.py, Attention in llama/model.py). Nothing
here is downloaded.
"""

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Optional

import torch
from torch.utils import cpp_extension

SOURCES = [Path(__file__).parent / "csrc" / name for name in ("quantized_gemv.cpp", "decode_attention.cpp")]
NEEDED_CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_vnni", "f16c", "fma")
# -ffast-math lets the compiler vectorise the attention's sums and exponentials (about 2x there);
# the kernels never rely on infinities or NaNs.
CFLAGS = ["-O3", "-std=c++17", "-fPIC", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni",
          "-mf16c", "-mfma", "-fopenmp", "-ffast-math"]


def _cpu_flags() -> set:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def _cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "llama-runner" / "kernels"


def library_path(compiler: str) -> Path:
    """Where the built kernels are kept: a new name for new sources, PyTorch, compiler or flags."""
    sources = b"".join(source.read_bytes() for source in SOURCES)
    key = hashlib.sha256(sources + " ".join([torch.__version__, compiler, *CFLAGS]).encode()).hexdigest()[:16]
    return _cache_dir() / f"llama_cpu-{key}.so"


def _build(compiler: str, output: Path) -> Optional[str]:
    """Compiles the sources side by side (one process each), then links them into `output`.
    Returns the compiler's complaint on failure."""
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    includes = [f"-I{path}" for path in cpp_extension.include_paths()]
    objects = [output.with_name(source.stem + ".o") for source in SOURCES]
    compiling = [subprocess.Popen([compiler, *CFLAGS, abi, *includes, "-c", str(source), "-o", str(obj)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                 for source, obj in zip(SOURCES, objects)]
    complaints = [proc.communicate()[1] for proc in compiling]
    if any(proc.returncode for proc in compiling):
        return "".join(complaints)
    libraries = cpp_extension.library_paths()
    link = [compiler, "-shared", "-fopenmp", *map(str, objects), *[f"-L{path}" for path in libraries],
            "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{libraries[0]}", "-o", str(output)]
    result = subprocess.run(link, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return result.stderr if result.returncode else None


@lru_cache(maxsize=None)
def load() -> Optional[str]:
    """Builds (first time on this machine) and loads the kernels as torch.ops.llama_cpu.*; returns
    None when they are ready, or why they cannot be used here."""
    if os.environ.get("LLAMA_CPU_KERNELS", "1") == "0":
        return "LLAMA_CPU_KERNELS=0"
    missing = [flag for flag in NEEDED_CPU_FLAGS if flag not in _cpu_flags()]
    if missing:
        return f"this CPU lacks {', '.join(missing)}"
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        return "no C++ compiler found (install g++ or set CXX)"
    library = library_path(compiler)
    if not library.exists():
        library.parent.mkdir(parents=True, exist_ok=True)
        # Each rank may build at once: each writes its own file and renames it into place.
        with tempfile.TemporaryDirectory(dir=library.parent) as scratch:
            built = Path(scratch) / library.name
            try:
                complaint = _build(compiler, built)
            except OSError as error:  # e.g. $CXX names no program
                complaint = str(error)
            if complaint is not None:
                return f"building our kernels failed: {complaint.strip()[-500:]}"
            os.replace(built, library)
    try:
        torch.ops.load_library(str(library))
    except OSError as error:  # a damaged file in the cache, say: deleting it rebuilds it
        return f"loading {library} failed: {error}"
    _register_fake_kernels()
    return None


def _register_fake_kernels() -> None:
    """Output shapes for torch.compile, which traces these ops without running them."""
    @torch.library.register_fake("llama_cpu::int4_gemv")
    def _(x, packed):
        return x.new_empty(x.shape[0], packed.shape[0] * 16)

    @torch.library.register_fake("llama_cpu::int8_gemv")
    def _(x, weight, scales):
        return x.new_empty(x.shape[0], weight.shape[0] * 16)

    @torch.library.register_fake("llama_cpu::decode_attention")
    def _(q, keys, values, mask):
        return q.new_empty(q.shape)


if __name__ == "__main__":
    reason = load()
    print("llama_cpu kernels ready" if reason is None else f"llama_cpu kernels not used: {reason}")
    sys.exit(0 if reason is None else 1)
