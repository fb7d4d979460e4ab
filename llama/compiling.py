"""The compiled decode step, when it is compiled, and where its compiled code is kept between processes.

Compiling costs tens of seconds on the first step of each batch size, once per process; it pays
in long-running modes (interactive chat, the server), which therefore compile unless told not to,
and not in a one-shot script, which stays eager unless asked (Meta's behaviour). PyTorch keeps
what it compiled on disk (inductor's FX graph cache and the AOTAutograd cache): we point those at a
per-user folder that survives reboots, so a second start of the same model compiles in seconds.
"""

import os
from contextlib import nullcontext
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

from . import cpu_kernels
from .args import cache_length
from .distributed import collective_timeout

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
    Returns the folder. Importing llama calls it, before anything imports torch._dynamo (which
    sets the variable to PyTorch's /tmp default)."""
    if CACHE_ENV not in os.environ:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        os.environ[CACHE_ENV] = str(base / "llama-runner" / "torchinductor")
    return Path(os.environ[CACHE_ENV])


def key_bucket(kv_len: int, cache_len: int, smallest: int = 256) -> int:
    """How many cache positions a compiled CUDA step attends over for kv_len live ones: the next
    power of two, at least `smallest`, at most the whole cache (a multiple of 16, as the mask
    must be). The positions past kv_len are masked."""
    return min(max(smallest, 1 << (kv_len - 1).bit_length()), cache_len)


def padded_widths(max_batch_size: int) -> List[int]:
    """The batch widths a CUDA step is padded to: the powers of two below max_batch_size, and
    max_batch_size itself. Each width is its own CUDA graph, so a few of them serve every batch."""
    return [w for w in (1 << n for n in range(max_batch_size.bit_length())) if w < max_batch_size] + [max_batch_size]


# How long a step that may compile lets the model's collectives wait for the other ranks: compile
# times differ between ranks (a cold cache on one, a warm one on another), by minutes at worst.
FIRST_STEP_TIMEOUT = 30 * 60.0


class CompiledDecode:
    """The model's one-token step (Transformer.decode_step) under torch.compile, applied from
    outside the model: Llama.build(compile=True) makes one and hands it to the engine, which calls
    it for every decode step (the prefill stays eager: it runs once per batch and is compute-bound).

    On CPU the batch width and the attended length are dynamic dimensions, so a few compiled graphs
    serve every step (dynamo compiles width 1 apart, and splits wider batches where the products
    change form: layers.GEMV_MAX_ROWS). On CUDA each shape is replayed as a CUDA graph, so shapes
    are kept few: the batch is padded to one of padded_widths() (placeholder rows at the scratch
    position of free cache rows, which the engine leaves past its last occupied slot: see
    args.cache_length), and the step attends
    over a bucket of the cache (key_bucket: a power of two from 256 on), masked, rather than the
    whole cache every step.

    A shape's first call may compile, for tens of seconds (minutes on a large model with a cold
    cache), so it runs with a long collective timeout (distributed.collective_timeout); warm_up()
    makes every such call up front, for a server that must not stall once it says it is ready.
    The compiled code is kept on disk (use_persistent_compile_cache), so a later process compiling
    the same model reuses it."""

    def __init__(self, model, pad_widths: Optional[bool] = None):
        """pad_widths: pad the batch to padded_widths() (default: on CUDA only)."""
        weight = model.norm.weight
        self.device = weight.device
        self.max_batch_size = model.params.max_batch_size
        self.scratch = model.params.max_seq_len  # the cache position placeholder rows write to
        self.cache_len = cache_length(model.params.max_seq_len) if self.device.type == "cuda" else None
        self.widths = padded_widths(self.max_batch_size) if (self.device.type == "cuda" if pad_widths is None
                                                              else pad_widths) else None
        self._key_positions: Dict[int, torch.Tensor] = {}  # by bucket (CUDA): made once, not every step
        self._shapes_run = set()  # (width, key bucket) that have run: they will not compile again
        # On CPU, PyTorch's attention kernel spends ~25 us a call setting up for a step's tiny
        # attention; ours takes about half (in fp32, where it can be built: llama/cpu_kernels.py).
        if self.device.type == "cpu" and weight.dtype == torch.float32 and cpu_kernels.load() is None:
            for layer in model.layers:
                layer.attention.decode_attention = cpu_kernels.ops().decode_attention
        self.compiled = torch.compile(model.decode_step, mode=None if self.cache_len is None else "reduce-overhead")

    @torch.inference_mode()
    def __call__(self, tokens: torch.Tensor, start_pos: torch.Tensor, kv_len: int) -> torch.Tensor:
        """tokens (batch, 1) on the model's device; start_pos (batch,) each row's position;
        kv_len: the cache positions to attend over (> every position). Returns float logits
        (batch, vocab), as the model's forward with last_index would."""
        batch = tokens.shape[0]
        positions = start_pos.to(self.device).unsqueeze(1)
        width = batch if self.widths is None else next(w for w in self.widths if w >= batch)
        if width > batch:  # placeholder rows: token 0 at the scratch position of free cache rows
            tokens = F.pad(tokens, (0, 0, 0, width - batch))
            positions = F.pad(positions, (0, 0, 0, width - batch), value=self.scratch)
        if self.cache_len is not None:
            bucket = key_bucket(kv_len, self.cache_len)
            key_positions = self._key_positions.get(bucket)
            if key_positions is None:
                key_positions = self._key_positions[bucket] = torch.arange(bucket, device=self.device)
        else:
            bucket = None
            key_positions = torch.arange(kv_len, device=self.device)
            torch._dynamo.maybe_mark_dynamic(key_positions, 0)
        shape = (width, bucket)
        # Guards built with this setting skip the checks of every module whose attributes have
        # not changed since: ~0.4 ms less per step on our CPU (about 6% of an int4 step of SmolLM2).
        with torch._dynamo.config.patch(use_recursive_dict_tags_for_guards=True), \
                (nullcontext() if shape in self._shapes_run else collective_timeout(FIRST_STEP_TIMEOUT)):
            logits = self.compiled(tokens, positions, key_positions)
        self._shapes_run.add(shape)
        return logits[:batch]

    @torch.inference_mode()  # as the engine's steps run: inference tensors are guarded apart
    def warm_up(self) -> None:
        """Runs every shape the engine's steps can take, so none compiles later (a server calls
        this on every rank, in step, before it says it is ready). Its rows write at the scratch
        position only, so it may run at any time."""
        widths = self.widths or range(1, self.max_batch_size + 1)  # CPU: cheap once the few graphs exist
        kv_lens = [2] if self.cache_len is None else sorted({key_bucket(n, self.cache_len)
                                                             for n in range(1, self.scratch + 1)})
        for width in widths:
            for kv_len in kv_lens:
                self(torch.zeros((width, 1), dtype=torch.long, device=self.device),
                     torch.full((width,), self.scratch, dtype=torch.long), kv_len)
