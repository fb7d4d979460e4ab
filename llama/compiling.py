"""When the decode step is compiled, and where its compiled code is kept between processes.

Compiling costs tens of seconds on the first step of each batch size, once per process; it pays
in long-running modes (interactive chat, the server), which therefore compile unless told not to,
and not in a one-shot script, which stays eager unless asked (Meta's behaviour). PyTorch keeps
what it compiled on disk (inductor's FX graph cache and the AOTAutograd cache): we point those at a
per-user folder that survives reboots, so a second start of the same model compiles in seconds.
"""

import os
from pathlib import Path
from typing import Optional

CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"  # PyTorch's own setting; a value the user gave is kept


def compile_by_default(compile: Optional[bool], long_running: bool) -> bool:
    """The compile flag as given, or when not given (None): on for long-running modes only."""
    if compile is None:
        return long_running
    if not isinstance(compile, bool):
        raise ValueError(f"compile must be True or False, got {compile!r}")
    return compile


def use_persistent_compile_cache() -> Path:
    """Keeps PyTorch's on-disk compile caches in ~/.cache/llama-runner/torchinductor (or
    $XDG_CACHE_HOME/...) rather than in /tmp, unless TORCHINDUCTOR_CACHE_DIR is already set.
    Returns the folder. Safe to call more than once."""
    if CACHE_ENV not in os.environ:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        os.environ[CACHE_ENV] = str(base / "llama-runner" / "torchinductor")
    return Path(os.environ[CACHE_ENV])
