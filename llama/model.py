"""The Llama transformer: RMSNorm, RoPE (with Llama 3.1 scaling), grouped-query attention with a
static KV cache, SwiGLU. Large weights live in fairscale's model-parallel layers, so each rank
holds its slice; which slice is decided in checkpoint.py. The layers that read the same input are
one layer each (q, k and v: wqkv; w1 and w3: w13), so a step makes one product of them; loading
fills them from Meta's separate tensors.

Every sequence in a batch carries its own position, so prompts of different lengths are prefilled
together and then advance one token per step, each at its own place in the cache.
"""

from contextlib import contextmanager
from typing import Iterator, Optional, Tuple

import torch
import torch.nn.functional as F
from fairscale.nn.model_parallel.initialize import get_model_parallel_world_size
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from .args import ModelArgs, cache_length
from .layers import ColumnParallel, DimParallel, RowParallel, VocabParallel
from .rope import rope_frequencies


class _AllocateOnMeta(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if "device" in kwargs:
            kwargs["device"] = torch.device("meta")
        return func(*args, **kwargs)


@contextmanager
def skeleton() -> Iterator[None]:
    """Builds modules whose parameters take no memory. `with torch.device("meta")` alone is not
    enough: fairscale allocates with the legacy torch.Tensor(n, m), which ignores it."""
    with _AllocateOnMeta():
        yield


def _keep(x: torch.Tensor) -> torch.Tensor:
    # fairscale's layers want an init function; weights come from the checkpoint instead.
    return x


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 like Meta's code, so bf16/fp16 runs stay close to fp32.
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def rope_tables(args: ModelArgs, length: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    angles = torch.outer(torch.arange(length, dtype=torch.float32), rope_frequencies(args))
    return angles.cos().to(device), angles.sin().to(device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates pairs (2i, 2i+1) of the last dim, as Meta's complex-number form does.
    x: (batch, seq, heads, head_dim); cos/sin: (batch, seq, head_dim // 2)."""
    pairs = x.float().unflatten(-1, (-1, 2))
    real, imag = pairs[..., 0], pairs[..., 1]
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    rotated = torch.stack((real * cos - imag * sin, real * sin + imag * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        world = get_model_parallel_world_size()
        self.head_dim = args.head_dim
        self.n_local_heads = args.n_heads // world
        # With more ranks than KV heads, each rank keeps one (replicated) KV head.
        self.n_local_kv_heads = max(args.n_kv_heads // world, 1)
        # This rank's rows of wq, then of wk, then of wv (Meta's three tensors, llama/checkpoint.py).
        local_heads = (self.n_local_heads, self.n_local_kv_heads, self.n_local_kv_heads)
        self.qkv_sizes = [n * self.head_dim for n in local_heads]
        self.wqkv = ColumnParallel(args.dim, sum(self.qkv_sizes) * world, bias=False, gather_output=False,
                                   init_method=_keep)
        self.wqkv.parts = self.qkv_sizes
        self.wo = RowParallel(args.n_heads * self.head_dim, args.dim, bias=False,
                              input_is_parallel=True, init_method=_keep)
        # Buffers (not saved with the weights): a CUDA graph then treats the cache as a fixed input
        # that the step updates in place, rather than as one it must copy in on every replay.
        self.register_buffer("cache_k", None, persistent=False)
        self.register_buffer("cache_v", None, persistent=False)
        # A lever, set from outside: attention for one new position per sequence, called as attend()
        # is (llama/compiling.py sets our CPU kernel, llama/csrc/decode_attention.cpp, where it
        # runs); None: PyTorch's scaled_dot_product_attention.
        self.decode_attention = None

    def setup_cache(self, max_batch_size: int, max_seq_len: int, device: torch.device, dtype: torch.dtype) -> None:
        # (batch, kv_heads, position, head_dim): the layout scaled_dot_product_attention reads directly.
        shape = (max_batch_size, self.n_local_kv_heads, cache_length(max_seq_len), self.head_dim)
        self.cache_k = torch.zeros(shape, device=device, dtype=dtype)
        self.cache_v = torch.zeros(shape, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        batch, seq, _ = x.shape
        q, k, v = self.wqkv(x).split(self.qkv_sizes, dim=-1)
        q = q.view(batch, seq, self.n_local_heads, self.head_dim)
        k = k.view(batch, seq, self.n_local_kv_heads, self.head_dim)
        v = v.view(batch, seq, self.n_local_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        # Write this step's keys/values at each sequence's own positions, in its own cache row.
        in_order = rows is None  # the first `batch` rows: read back as a view rather than a copy
        if in_order:
            rows = torch.arange(batch, device=x.device)
        self.cache_k[rows.unsqueeze(1), :, positions] = k
        self.cache_v[rows.unsqueeze(1), :, positions] = v
        kv_len = seq if mask is None else mask.shape[-1]  # no mask: causal from position 0
        keys = self.cache_k[:batch, :, :kv_len] if in_order else self.cache_k[rows, :, :kv_len]
        values = self.cache_v[:batch, :, :kv_len] if in_order else self.cache_v[rows, :, :kv_len]

        out = self.attend(q.transpose(1, 2), keys, values, mask)
        return self.wo(out.transpose(1, 2).reshape(batch, seq, -1))

    def copy_cache(self, source_row: int, target_row: int, length: int) -> None:
        """Copies the keys and values of a cache row's first `length` positions to another row."""
        self.cache_k[target_row, :, :length] = self.cache_k[source_row, :, :length]
        self.cache_v[target_row, :, :length] = self.cache_v[source_row, :, :length]

    def attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
               mask: Optional[torch.Tensor]) -> torch.Tensor:
        """Masked softmax attention, each query head reading its group's KV head. q: (batch, heads,
        seq, head_dim); keys, values: (batch, kv_heads, kv_len, head_dim); mask: (batch, 1, seq,
        kv_len), True where a query may look, or None for causal attention from position 0 (q's
        positions are then keys' positions). Returns q's shape."""
        one_position = q.shape[2] == 1 and mask is not None
        if one_position and self.decode_attention is not None:
            return self.decode_attention(q, keys, values, mask)
        if one_position and q.is_cuda and keys.shape[1] != q.shape[1]:
            return attend_groups_folded(q, keys, values, mask)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=mask is None,
                                              enable_gqa=keys.shape[1] != q.shape[1])


def attend_groups_folded(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One new position per sequence with grouped KV heads, as an attention of kv_heads heads over
    `groups` query positions each: a shape CUDA's memory-efficient kernel takes with a mask (with
    unequal head counts SDPA falls back to its math kernel, which copies K/V for every query head
    and builds the whole score matrix). q: (batch, heads, 1, head_dim); the rest as attend()."""
    batch, heads, _, head_dim = q.shape
    kv_heads = keys.shape[1]
    folded = q.reshape(batch, kv_heads, heads // kv_heads, head_dim)  # query head h reads KV head h // groups
    out = F.scaled_dot_product_attention(folded, keys, values, attn_mask=mask)
    return out.reshape(batch, heads, 1, head_dim)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        # This rank's rows of w1 (the gate), then of w3.
        self.w13 = ColumnParallel(dim, 2 * hidden_dim, bias=False, gather_output=False, init_method=_keep)
        self.w13.parts = [self.w13.output_size_per_partition // 2] * 2
        self.w2 = RowParallel(hidden_dim, dim, bias=False, input_is_parallel=True, init_method=_keep)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden_dim)
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)

    def forward(self, x, positions, cos, sin, mask, rows=None):
        h = x + self.attention(self.attention_norm(x), positions, cos, sin, mask, rows)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, params: ModelArgs, embedding_split: str = "vocab"):
        """embedding_split: "vocab" (rows split across ranks, Llama 3 style) or "dim" (features
        split, Llama 2 style)."""
        super().__init__()
        self.params = params
        self.vocab_size = params.vocab_size
        self.n_layers = params.n_layers
        embedding = VocabParallel if embedding_split == "vocab" else DimParallel
        self.tok_embeddings = embedding(params.vocab_size, params.dim, init_method=_keep)
        self.layers = nn.ModuleList(TransformerBlock(i, params) for i in range(params.n_layers))
        self.norm = RMSNorm(params.dim, eps=params.norm_eps)
        self.output = ColumnParallel(params.dim, params.vocab_size, bias=False, init_method=_keep)
        self.rope_cos: Optional[torch.Tensor] = None
        self.rope_sin: Optional[torch.Tensor] = None

    def setup_caches(self, max_batch_size: int, max_seq_len: int) -> None:
        """Allocates the KV cache and RoPE tables once the weights are real."""
        device, dtype = self.norm.weight.device, self.norm.weight.dtype
        self.rope_cos, self.rope_sin = rope_tables(self.params, max_seq_len + 1, device)  # + scratch
        for layer in self.layers:
            layer.attention.setup_cache(max_batch_size, max_seq_len, device, dtype)

    @torch.inference_mode()
    def copy_cache(self, source_row: int, target_row: int, length: int) -> None:
        """Copies what a KV-cache row holds at its first `length` positions to another row, in
        every layer (a prefix reused by another request: llama/prefixes.py)."""
        for layer in self.layers:
            layer.attention.copy_cache(source_row, target_row, length)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, start_pos, last_index: Optional[torch.Tensor] = None,
                kv_len: Optional[int] = None, rows: Optional[torch.Tensor] = None,
                causal: Optional[bool] = None, hidden: bool = False) -> torch.Tensor:
        """tokens: (batch, seq). start_pos: an int, or a (batch,) tensor giving each row's position
        of tokens[:, 0]. Keys/values are written to the cache at those positions, and each query
        attends to its own row's cache up to its position.

        Returns float logits (batch, seq, vocab), or (batch, vocab) taken at tokens[:, last_index]
        when last_index (batch,) is given, which skips the vocab projection everywhere else.
        kv_len: how many cache positions to attend over (> every position in this call); a caller
        that knows it avoids reading positions back from the device.
        rows: (batch,) the KV-cache row of each batch row (default: the first `batch` rows), so that
        new prompts can be prefilled into free slots while other rows hold running sequences.
        causal: for a prefill from position 0 (start_pos 0, kv_len = seq), attend causally with no
        mask, which CUDA's fast attention kernels need (they refuse any mask); None: on CUDA only
        (on CPU the masked call is as fast, and keeps its results to the last bit).
        hidden: return the last block's hidden states (batch, seq, dim), in the model's dtype,
        instead: logits() turns them into logits, so a caller can project a few positions at a
        time (llama/prompt_logprobs.py)."""
        batch, seq = tokens.shape
        from_start = not isinstance(start_pos, torch.Tensor) and int(start_pos) == 0 and kv_len in (None, seq)
        if causal is None:
            causal = from_start and tokens.is_cuda
        elif causal and not from_start:
            raise ValueError("causal=True needs a prefill from position 0 (start_pos 0, kv_len equal to seq)")
        if not isinstance(start_pos, torch.Tensor):
            start_pos = torch.full((batch,), int(start_pos), dtype=torch.long)
        start_pos = start_pos.to(tokens.device)
        positions = start_pos.unsqueeze(1) + torch.arange(seq, device=tokens.device)  # (batch, seq)
        if kv_len is None:
            kv_len = int(positions.max()) + 1
        if rows is not None:
            rows = rows.to(tokens.device)
        key_positions = torch.arange(kv_len, device=tokens.device)
        if hidden:
            return self._hidden(tokens, positions, key_positions, rows, causal)
        return self._forward(tokens, positions, key_positions, last_index, rows, causal)

    def _forward(self, tokens: torch.Tensor, positions: torch.Tensor, key_positions: torch.Tensor,
                 last_index: Optional[torch.Tensor] = None, rows: Optional[torch.Tensor] = None,
                 causal: bool = False) -> torch.Tensor:
        h = self._hidden(tokens, positions, key_positions, rows, causal)
        if last_index is not None:
            h = h[torch.arange(tokens.shape[0], device=h.device), last_index.to(h.device)]
        return self.logits(h)

    def _hidden(self, tokens: torch.Tensor, positions: torch.Tensor, key_positions: torch.Tensor,
                rows: Optional[torch.Tensor], causal: bool) -> torch.Tensor:
        mask = None if causal else (key_positions <= positions.unsqueeze(-1)).unsqueeze(1)  # (batch, 1, seq, kv_len)
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h, positions, cos, sin, mask, rows)
        return h

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Float logits (..., vocab) of the last block's hidden states h (..., dim) (forward's
        hidden=True)."""
        return self.output(self.norm(h)).float()

    def decode_step(self, tokens: torch.Tensor, positions: torch.Tensor, key_positions: torch.Tensor) -> torch.Tensor:
        """One new token per sequence, the step llama/compiling.py compiles: tokens and positions
        (batch, 1), key_positions (kv_len,) the cache positions to attend over. Returns float
        logits (batch, vocab)."""
        return self._forward(tokens, positions, key_positions)[:, 0]
