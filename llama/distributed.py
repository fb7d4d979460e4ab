"""Process group, device choice and model-parallel setup. Works under torchrun (one or several
nodes) and as a plain single process."""

import atexit
import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional, Union

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
        if device.index is None:  # under torchrun, each local rank takes its own GPU
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    elif device.type != "cpu":
        raise ValueError(f"unsupported device {device}; use 'auto', 'cuda', 'cuda:N' or 'cpu'")
    return device


def resolve_dtype(dtype: Union[None, str, torch.dtype], device: torch.device) -> torch.dtype:
    """None/"auto": bf16 on GPUs that support it, else fp16 on GPU, fp32 on CPU."""
    if dtype is None or dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"unsupported dtype {dtype}; use bf16, fp16 or fp32")
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of bf16, fp16, fp32")
    return DTYPES[dtype]


def init_model_parallel(device: torch.device, model_parallel_size: Optional[int],
                        timeout: timedelta = timedelta(minutes=10)) -> None:
    """Joins (or creates) the process group and fairscale's model-parallel groups. A collective
    that waits longer than `timeout` for the other ranks raises."""
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if "WORLD_SIZE" in os.environ and "RANK" in os.environ:  # launched by torchrun
            if device.type == "cuda":
                torch.cuda.set_device(device)
            dist.init_process_group(backend, timeout=timeout)
        else:  # a plain `python script.py`: a group of one, no ports or env vars needed
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        atexit.register(_destroy_process_groups)
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


def _destroy_process_groups() -> None:
    """At exit, while the interpreter is still whole: frees every process group, which joins its
    gloo threads. A group is freed when its last reference goes, and destroy_process_group() drops
    only torch's own: fairscale's module globals hold the model-parallel, data-parallel and
    pipeline groups, so they are dropped first (and see the import of torch.distributed.nn.functional
    above for the default group). Groups left alive keep their gloo threads running into the
    interpreter's shutdown and C++'s static destructors, where now and then a rank whose work was
    done aborted ("terminate called without an active exception", SIGABRT). tests/test_streaming.py
    checks that no gloo thread is left once this has run."""
    if dist.is_initialized():
        sys.stdout.flush()
        if model_parallel_is_initialized():
            destroy_model_parallel()
        dist.destroy_process_group()


def placement(device: torch.device, dtype: torch.dtype) -> Placement:
    return Placement(device, dtype, get_model_parallel_rank(), get_model_parallel_world_size())


def is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def silence_other_ranks() -> None:
    """Only global rank 0 prints; the others would repeat the same lines."""
    if not is_main_process():
        sys.stdout = open(os.devnull, "w")
