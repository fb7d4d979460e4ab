"""Our own CPU kernels (llama/csrc/: the quantized and bf16 products, one-position attention),
built once per machine with the system's C++ compiler and kept in ~/.cache/llama-runner/kernels.

Each kernel is written once over a few vector operations (llama/csrc/simd.h) and compiled for one
of three x86 variants, the best this CPU can run chosen from its flags:

- avx512-vnni: AVX-512 F/BW/VL + VNNI (Intel since Cascade Lake, AMD Zen 4 and 5);
- avx-vnni: AVX2 + the 256-bit VNNI (Intel since Alder Lake);
- avx2: AVX2 + FMA + F16C (x86-64 CPUs of the last decade).

All variants share the weight layouts and compute each lane's sums in the same order, so their
products agree to within rounding (the build's -ffast-math may contract operations differently). LLAMA_CPU_KERNELS=0 turns them off and LLAMA_CPU_KERNELS=<variant> asks for one;
where none can run (another CPU, no compiler) `load()` returns the reason and the model runs on
PyTorch's kernels (llama/quantize.py, llama/bf16.py, Attention in llama/model.py). Nothing here is
downloaded.
"""

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional, Tuple

import torch

CSRC = Path(__file__).parent / "csrc"
SOURCES = [CSRC / name for name in ("ops.cpp", "quantized_gemv.cpp", "bf16_gemv.cpp", "decode_attention.cpp")]
HEADERS = [CSRC / "simd.h"]
# -ffast-math lets the compiler vectorise the attention's sums and exponentials (about 2x there);
# the kernels never rely on infinities or NaNs.
COMMON_CFLAGS = ("-O3", "-std=c++17", "-fPIC", "-fopenmp", "-ffast-math")


@dataclass(frozen=True)
class Variant:
    name: str
    cpu_flags: Tuple[str, ...]  # as /proc/cpuinfo names them
    cflags: Tuple[str, ...]

    @property
    def namespace(self) -> str:  # torch.ops.<namespace>.int4_gemv, ...
        return "llama_" + self.name.replace("-", "_")


_AVX2 = ("avx2", "fma", "f16c")
VARIANTS = (  # best first
    Variant("avx512-vnni", ("avx512f", "avx512bw", "avx512vl", "avx512_vnni", *_AVX2),
            ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mavx2", "-mfma", "-mf16c",
             "-DLLAMA_AVX512_VNNI")),
    Variant("avx-vnni", ("avx_vnni", *_AVX2), ("-mavxvnni", "-mavx2", "-mfma", "-mf16c", "-DLLAMA_AVX_VNNI")),
    Variant("avx2", _AVX2, ("-mavx2", "-mfma", "-mf16c")),
)


def _cpu_flags() -> set:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def missing_flags(variant: Variant) -> list:
    """The CPU flags `variant` needs that this CPU lacks."""
    flags = _cpu_flags()
    return [flag for flag in variant.cpu_flags if flag not in flags]


def _cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "llama-runner" / "kernels"


def _cflags(variant: Variant) -> list:
    return [*COMMON_CFLAGS, *variant.cflags, f"-DLLAMA_OPS={variant.namespace}"]


def library_path(compiler: str, variant: Variant) -> Path:
    """Where a variant's kernels are kept: a new name for new sources, PyTorch, compiler or flags."""
    sources = b"".join(path.read_bytes() for path in SOURCES + HEADERS)
    key = hashlib.sha256(sources + " ".join([torch.__version__, compiler, *_cflags(variant)]).encode()).hexdigest()
    return _cache_dir() / f"{variant.namespace}-{key[:16]}.so"


def _build(compiler: str, variant: Variant, output: Path) -> Optional[str]:
    """Compiles the sources side by side (one process each), then links them into `output`.
    Returns the compiler's complaint on failure."""
    from torch.utils import cpp_extension  # only here: it imports setuptools, a third of a second at every start

    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    includes = [f"-I{path}" for path in cpp_extension.include_paths()]
    objects = [output.with_name(source.stem + ".o") for source in SOURCES]
    compiling = [subprocess.Popen([compiler, *_cflags(variant), abi, *includes, "-c", str(source), "-o", str(obj)],
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
def load_variant(variant: Variant) -> Optional[str]:
    """Builds (first time on this machine) and loads one variant as torch.ops.<namespace>.*;
    returns None when it is ready, or why it cannot be used here."""
    missing = missing_flags(variant)
    if missing:
        return f"this CPU lacks {', '.join(missing)}"
    if hasattr(torch.ops, variant.namespace) and hasattr(ops(variant), "int4_gemv"):
        return None  # loaded earlier in this process (a namespace registers once)
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        return "no C++ compiler found (install g++ or set CXX)"
    library = library_path(compiler, variant)
    if not library.exists():
        library.parent.mkdir(parents=True, exist_ok=True)
        # Each rank may build at once: each writes its own file and renames it into place.
        with tempfile.TemporaryDirectory(dir=library.parent) as scratch:
            built = Path(scratch) / library.name
            try:
                complaint = _build(compiler, variant, built)
            except OSError as error:  # e.g. $CXX names no program
                complaint = str(error)
            if complaint is not None:
                return f"building our kernels failed: {complaint.strip()[-500:]}"
            os.replace(built, library)
    try:
        torch.ops.load_library(str(library))
    except OSError as error:  # a damaged file in the cache, say: deleting it rebuilds it
        return f"loading {library} failed: {error}"
    _register_fake_kernels(variant.namespace)
    return None


@lru_cache(maxsize=None)
def _choose() -> Tuple[Optional[Variant], Optional[str]]:
    wanted = os.environ.get("LLAMA_CPU_KERNELS", "1")
    if wanted == "0":
        return None, "LLAMA_CPU_KERNELS=0"
    names = [variant.name for variant in VARIANTS]
    if wanted != "1" and wanted not in names:
        return None, f"LLAMA_CPU_KERNELS={wanted} names no variant; use 0, 1 or one of {names}"
    reasons = []
    for variant in VARIANTS:
        if wanted not in ("1", variant.name):
            continue
        reason = load_variant(variant)
        if reason is None:
            return variant, None
        reasons.append(f"{variant.name}: {reason}")
        if reason.startswith(("building", "loading", "no C++")):
            break  # the next variant would fail the same way
    return None, "; ".join(reasons)


def load() -> Optional[str]:
    """Makes the best variant this CPU runs ready; returns None, or why none can be used here."""
    return _choose()[1]


load.cache_clear = _choose.cache_clear  # tests change the environment and look again


def chosen() -> Optional[Variant]:
    """The variant in use, or None where PyTorch's kernels run."""
    return _choose()[0]


def ops(variant: Optional[Variant] = None):
    """The ops of `variant` (default: the one in use), e.g. ops().int4_gemv(x, packed)."""
    variant = variant or chosen()
    assert variant is not None, "our CPU kernels are not loaded here (cpu_kernels.load() says why)"
    return getattr(torch.ops, variant.namespace)


def describe() -> str:
    """How the output names them: "our kernels (avx2)" or "PyTorch's kernels (ours: <why not>)"."""
    variant, reason = _choose()
    return f"our kernels ({variant.name})" if variant else f"PyTorch's kernels (ours: {reason})"


def _register_fake_kernels(namespace: str) -> None:
    """Output shapes for torch.compile, which traces these ops without running them."""
    @torch.library.register_fake(f"{namespace}::int4_gemv")
    def _(x, packed):
        return x.new_empty(x.shape[0], packed.shape[0] * 16)

    @torch.library.register_fake(f"{namespace}::int8_gemv")
    def _(x, weight, scales):
        return x.new_empty(x.shape[0], weight.shape[0] * 16)

    @torch.library.register_fake(f"{namespace}::bf16_gemv")
    def _(x, weight):
        return x.new_empty(x.shape[0], weight.shape[0])

    @torch.library.register_fake(f"{namespace}::decode_attention")
    def _(q, keys, values, mask):
        return q.new_empty(q.shape)


if __name__ == "__main__":
    reason = load()
    print(f"llama CPU kernels: {describe()}")
    sys.exit(0 if reason is None else 1)
