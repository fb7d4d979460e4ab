"""Device and dtype choice for GPU runs, checked without a GPU (fake device counts and compute
capabilities): a rank per GPU and never two on one, bf16 only where the GPU computes in it, and
quantization refused on CUDA until a CUDA kernel exists."""

from datetime import timedelta

import pytest
import torch

from llama import distributed
from llama.args import ModelArgs
from llama.distributed import control_group, gpu_default_dtype, rank_gpu, resolve_dtype
from llama.quantize import check_quantize


def test_each_local_rank_takes_its_own_gpu():
    assert [rank_gpu(None, r, 4, 4) for r in range(4)] == [0, 1, 2, 3]
    assert rank_gpu(None, 1, 2, 8) == 1  # fewer ranks than GPUs is fine
    assert rank_gpu(3, 0, 1, 4) == 3  # one rank may pick its GPU


@pytest.mark.parametrize("asked,local_rank,local_world,gpus,message", [
    (None, 2, 4, 2, r"4 ranks on this node but only 2 GPU\(s\) visible.*--nproc_per_node 2"),
    (None, 1, 1, 1, r"only 1 GPU\(s\) visible"),  # LOCAL_RANK past the GPUs, LOCAL_WORLD_SIZE unset
    (0, 1, 2, 2, r"device='cuda:0' would put all 2 ranks of this node on one GPU; use device='cuda'"),
    (5, 0, 1, 2, r"device='cuda:5' but this machine shows 2 GPU\(s\)"),
])
def test_two_ranks_on_one_gpu_are_refused(asked, local_rank, local_world, gpus, message):
    with pytest.raises(ValueError, match=message):
        rank_gpu(asked, local_rank, local_world, gpus)


@pytest.mark.parametrize("capability,dtype", [((7, 0), torch.float16), ((7, 5), torch.float16),
                                              ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)])
def test_bf16_by_default_only_where_the_gpu_computes_in_it(capability, dtype):
    assert gpu_default_dtype(capability) == dtype


def test_the_default_dtype_asks_the_rank_s_own_gpu(monkeypatch):
    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: asked.append(device) or (7, 0))
    assert resolve_dtype(None, torch.device("cuda", 1)) == torch.float16
    assert asked == [torch.device("cuda", 1)]
    assert resolve_dtype("bf16", torch.device("cuda", 1)) == torch.bfloat16  # asked for: kept
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_quantize_is_refused_on_cuda(quantize):
    args = ModelArgs(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=128, multiple_of=32)
    with pytest.raises(ValueError, match=rf"quantize='{quantize}' runs on CPU only.*leave quantize unset"):
        check_quantize(quantize, 32, args, 1, torch.device("cuda", 0))
    check_quantize(quantize, 32, args, 1, torch.device("cpu"))


def test_control_messages_go_over_gloo_beside_nccl(monkeypatch):
    """The server's plan and input shared from rank 0 never travel through NCCL (the GPU)."""
    made = []
    monkeypatch.setattr(distributed, "_control_group", None)
    monkeypatch.setattr(torch.distributed, "new_group", lambda **kwargs: made.append(kwargs) or "gloo group")
    monkeypatch.setattr(torch.distributed, "get_backend", lambda: "gloo")
    distributed._make_control_group(timedelta(seconds=5))
    assert control_group() is None and made == []  # the default group is gloo already
    monkeypatch.setattr(torch.distributed, "get_backend", lambda: "nccl")
    distributed._make_control_group(timedelta(seconds=5))
    distributed._make_control_group(timedelta(seconds=5))  # once only
    assert control_group() == "gloo group" and made == [{"backend": "gloo", "timeout": timedelta(seconds=5)}]


def test_compiled_cuda_graphs_are_dropped_before_the_groups_at_exit(monkeypatch):
    """Else destroy_process_group() can hang after NCCL work was captured in a CUDA graph."""
    import torch._dynamo
    from torch._inductor import cudagraph_trees
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch._dynamo, "reset", lambda: calls.append("dynamo"))
    monkeypatch.setattr(cudagraph_trees, "reset_cudagraph_trees", lambda: calls.append("graphs"))
    distributed._free_cuda_graphs()
    assert calls == ["dynamo", "graphs"]
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    distributed._free_cuda_graphs()  # a CPU run touches neither
    assert calls == ["dynamo", "graphs"]
