"""Process group, device choice and model-parallel setup. Works under torchrun (one or several
nodes) and as a plain single process."""

import atexit
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator, Optional, Tuple, Union

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d
# Imported before any process group exists: its functions take `group=group.WORLD` as a default
# argument, evaluated on import, and torch imports it lazily (with torch._dynamo, at the first
# nn.Parameter); imported after init_process_group, those defaults would hold the default group,
# which destroy_process_group() could then not free (see _destroy_process_groups).
import torch.distributed.nn.functional  # noqa: F401
from fairscale.nn.model_parallel.initialize import (
    destroy_model_parallel,
    get_model_parallel_group,
    get_model_parallel_rank,
    get_model_parallel_world_size,
    initialize_model_parallel,
    model_parallel_is_initialized,
)

from .dtypes import ALIASES as DTYPES  # every name a dtype may be given by



@dataclass
class Placement:
    device: torch.device
    dtype: torch.dtype
    rank: int  # rank within the model-parallel group: which slice of the weights this process holds
    world_size: int  # model-parallel size


def resolve_device(device: Union[str, torch.device] = "auto") -> torch.device:
    if str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):  # torch's message lists every backend it knows, not what we run on
        raise ValueError(f"unknown device {device!r}; use 'auto', 'cuda', 'cuda:N' or 'cpu'") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device='cuda' was asked for but no CUDA GPU is visible; use device='cpu'")
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        device = torch.device("cuda", rank_gpu(device.index, local_rank, local_world, torch.cuda.device_count()))
    elif device.type != "cpu":
        raise ValueError(f"unsupported device {device}; use 'auto', 'cuda', 'cuda:N' or 'cpu'")
    return device


def rank_gpu(asked: Optional[int], local_rank: int, local_world: int, gpus: int) -> int:
    """The GPU of this rank: its local rank's (one GPU per rank on a node), or the one asked for
    when the node runs a single rank. Two ranks on one GPU would only fail later, inside NCCL
    ("Duplicate GPU detected"), so that is refused here."""
    if asked is not None:
        if local_world > 1:
            raise ValueError(f"device='cuda:{asked}' would put all {local_world} ranks of this node on one GPU; "
                             f"use device='cuda' (each rank takes the GPU of its LOCAL_RANK)")
        if asked >= gpus:
            raise ValueError(f"device='cuda:{asked}' but this machine shows {gpus} GPU(s) (cuda:0 to cuda:{gpus - 1})")
        return asked
    if max(local_world, local_rank + 1) > gpus:
        raise ValueError(f"{local_world} ranks on this node but only {gpus} GPU(s) visible: NCCL needs one GPU per "
                         f"rank; run --nproc_per_node {gpus} or fewer (or check CUDA_VISIBLE_DEVICES)")
    return local_rank


def resolve_dtype(dtype: Union[None, str, torch.dtype], device: torch.device) -> torch.dtype:
    """None/"auto": bf16 on GPUs that compute in it natively, else fp16 on GPU, fp32 on CPU."""
    if dtype is None or dtype == "auto":
        if device.type == "cuda":
            return gpu_default_dtype(torch.cuda.get_device_capability(device))
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"unsupported dtype {dtype}; use bf16, fp16 or fp32")
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of bf16, fp16, fp32")
    return DTYPES[dtype]


def gpu_default_dtype(capability: Tuple[int, int]) -> torch.dtype:
    """bf16 from Ampere (compute capability 8.0) on; older GPUs (T4, V100) only emulate it, which
    torch.cuda.is_bf16_supported() counts as support, so they get fp16."""
    return torch.bfloat16 if tuple(capability) >= (8, 0) else torch.float16


def init_model_parallel(device: torch.device, model_parallel_size: Optional[int],
                        timeout: timedelta = timedelta(minutes=10)) -> None:
    """Joins (or creates) the process group and fairscale's model-parallel groups. A collective
    that waits longer than `timeout` for the other ranks raises."""
    global _collective_timeout
    if not dist.is_initialized():
        _collective_timeout = timeout
        backend = "nccl" if device.type == "cuda" else "gloo"
        if "WORLD_SIZE" in os.environ and "RANK" in os.environ:  # launched by torchrun
            if device.type == "cuda":
                torch.cuda.set_device(device)
                # Binding the group to this rank's GPU: NCCL then never guesses the device.
                dist.init_process_group(backend, timeout=timeout, device_id=device)
            else:
                dist.init_process_group(backend, timeout=timeout)
        else:  # a plain `python script.py`: a group of one, no ports or env vars needed
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        atexit.register(_destroy_process_groups)
    _make_control_group(timeout)
    world = dist.get_world_size()
    if model_parallel_size is None:
        model_parallel_size = world
    if model_parallel_size < 1 or world % model_parallel_size:
        raise ValueError(
            f"model_parallel_size={model_parallel_size} must divide the number of processes ({world}); "
            f"leave it unset to use all {world}"
        )
    if not model_parallel_is_initialized():
        # fairscale's new_group() calls pass no timeout, so torch would give its groups the 30-minute
        # default rather than ours: lend them ours while they are made.
        default = c10d.default_pg_timeout, c10d.default_pg_nccl_timeout
        c10d.default_pg_timeout = c10d.default_pg_nccl_timeout = timeout
        try:
            initialize_model_parallel(model_parallel_size)
        finally:
            c10d.default_pg_timeout, c10d.default_pg_nccl_timeout = default
    elif get_model_parallel_world_size() != model_parallel_size:
        raise ValueError(
            f"model parallel is already initialised with size {get_model_parallel_world_size()}, "
            f"not {model_parallel_size}"
        )


_control_group: Optional[dist.ProcessGroup] = None
_collective_timeout = timedelta(minutes=10)  # the groups' timeout, as init_model_parallel set it


@contextmanager
def collective_timeout(seconds: float) -> Iterator[None]:
    """Lets the model's collectives wait up to `seconds` inside the block, then restores the
    groups' own timeout. For a step that may compile first: compile times differ between ranks
    by minutes with a cold cache, and the first rank done would wait in the step's first
    collective longer than the usual timeout allows (NCCL's watchdog would then abort it)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        yield
        return
    groups = [None] + ([get_model_parallel_group()] if model_parallel_is_initialized() else [])
    for group in groups:
        c10d._set_pg_timeout(timedelta(seconds=seconds), group)
    try:
        yield
    finally:
        for group in groups:
            c10d._set_pg_timeout(_collective_timeout, group)


def _make_control_group(timeout: timedelta) -> None:
    """Every rank calls this once, in the same order (new_group is collective)."""
    global _control_group
    if _control_group is None and dist.get_backend() != "gloo":
        _control_group = dist.new_group(backend="gloo", timeout=timeout)


def control_group() -> Optional[dist.ProcessGroup]:
    """The group for the ranks' small host-side messages (the server's per-step plan, input read on
    rank 0): gloo, even beside NCCL, so that a message never goes through the GPU (a pickle copied
    to the device and back, each step) and the sending thread needs no CUDA device. None means the
    default group, itself gloo."""
    return _control_group


def rank_zero_draws(tokens: torch.Tensor) -> torch.Tensor:
    """The tokens (batch,) that global rank 0 sampled, on every rank, when the ranks run on GPUs.

    Every rank samples the same logits (the output layer's gather hands each rank the same tensor)
    with the same seeds, so the ranks agree wherever the same kernels draw the same random
    numbers. A CUDA sampling kernel's grid, and so which random number each element gets and how
    far the generator moves, follows the GPU's multiprocessor count (ATen's calc_execution_policy):
    ranks on different GPU models could pick different tokens, then stop at different steps and
    hang in their next collective. Rank 0's pick, sent over the gloo control group, settles it: one
    small message a step, beside a read-back the engine makes anyway. CPU ranks get no message (it
    would cost every step a gloo round trip): one machine's ranks run the same code; CPU nodes with
    different vector units are not covered."""
    if tokens.device.type == "cpu" or not dist.is_initialized() or dist.get_world_size() == 1:
        return tokens
    return broadcast_tokens(tokens)


def broadcast_tokens(tokens: torch.Tensor) -> torch.Tensor:
    """Global rank 0's tokens, on every rank, on tokens' device (through host memory)."""
    host = tokens.cpu()
    dist.broadcast(host, src=0, group=control_group())
    return host.to(tokens.device)


def _destroy_process_groups() -> None:
    """At exit, while the interpreter is still whole: frees every process group, which joins its
    gloo threads. A group is freed when its last reference goes, and destroy_process_group() drops
    only torch's own: fairscale's module globals hold the model-parallel, data-parallel and
    pipeline groups, so they are dropped first (and see the import of torch.distributed.nn.functional
    above for the default group). Groups left alive keep their gloo threads running into the
    interpreter's shutdown and C++'s static destructors, where now and then a rank whose work was
    done aborted ("terminate called without an active exception", SIGABRT). tests/test_streaming.py
    checks that no gloo thread is left once this has run."""
    global _control_group
    if dist.is_initialized():
        sys.stdout.flush()
        _control_group = None
        _free_cuda_graphs()
        if model_parallel_is_initialized():
            destroy_model_parallel()
        dist.destroy_process_group()


def _free_cuda_graphs() -> None:
    """CUDA graphs that captured NCCL work keep it alive, and destroy_process_group() then hangs
    (pytorch#115388): torchrun would wait forever for a rank whose work was done. Dropping the
    compiled code and its graphs first lets the groups go."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        from torch import _dynamo
        from torch._inductor import cudagraph_trees
        _dynamo.reset()
        cudagraph_trees.reset_cudagraph_trees()


def placement(device: torch.device, dtype: torch.dtype) -> Placement:
    return Placement(device, dtype, get_model_parallel_rank(), get_model_parallel_world_size())


def is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def silence_other_ranks() -> None:
    """Only global rank 0 prints; the others would repeat the same lines."""
    if not is_main_process():
        sys.stdout = open(os.devnull, "w")
