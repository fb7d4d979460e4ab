"""Building this rank's model from a checkpoint, for Llama.build: the checks that can refuse
before any weight is read (world size, quantization, memory), then a skeleton without memory that
receives this rank's slices one layer at a time, each turned into its products (quantized, bf16)
as soon as it is read (llama/checkpoint.py reads, llama/layers.py replaces)."""

import dataclasses
from pathlib import Path
from typing import List, Optional, Tuple

import torch

from . import bf16, cpu_kernels, memory
from .args import ModelArgs, load_params, rope_scaling_factor
from .checkpoint import ShardedCheckpoint, assign_weights, check_world_size, iter_rank_weights
from .distributed import placement
from .model import Transformer, skeleton
from .quantize import check_quantize, check_stored, describe, describe_stored, quantize_model
from .tokenizer import Tokenizer


def load_args(ckpt_dir: Path, tokenizer: Tokenizer, tokenizer_path: str, max_seq_len: int,
              max_batch_size: int) -> ModelArgs:
    """params.json, checked against the tokenizer that will run with it."""
    args = load_params(ckpt_dir, max_seq_len=max_seq_len, max_batch_size=max_batch_size)
    if args.vocab_size == -1:
        return dataclasses.replace(args, vocab_size=tokenizer.n_words)
    if args.vocab_size != tokenizer.n_words and not (
            # Hugging Face models often pad the embedding past the tokenizer (to a round size).
            tokenizer.kind == "huggingface" and args.vocab_size > tokenizer.n_words):
        raise ValueError(
            f"params.json says vocab_size={args.vocab_size} but the tokenizer {tokenizer_path} has "
            f"{tokenizer.n_words} tokens; pass the tokenizer that belongs to this checkpoint"
        )
    return args


def load_model(ckpt_dir: Path, args: ModelArgs, tokenizer: Tokenizer, device: torch.device, dtype: torch.dtype,
               quantize: Optional[str], quant_group: int) -> Tuple[Transformer, List[str]]:
    """This rank's model, ready to decode (KV cache allocated), and what it runs as (for the
    "Loaded" line)."""
    where = placement(device, dtype)
    check_world_size(args, where.world_size)
    checkpoint = ShardedCheckpoint(ckpt_dir, args)
    stored_mode = check_stored(checkpoint.quantization, quantize, args, where.world_size, device)
    if stored_mode in ("int4", "int8"):  # our quantizer's blocks: what is left float (a tied output) too
        quantize = stored_mode
    check_quantize(quantize, quant_group, args, where.world_size, device)
    if args.use_scaled_rope:
        factor, reason = rope_scaling_factor(args, tied_embeddings=checkpoint.tied)
        args = dataclasses.replace(args, rope_scaling_factor=factor)
        print(f"RoPE scaling factor {factor:g} ({reason})")
    embedding_split = checkpoint.embedding_split_on_disk or ("dim" if tokenizer.kind == "sentencepiece" else "vocab")
    need = memory.estimate(args, where.world_size, where.rank, dtype, checkpoint.tied, embedding_split,
                           quantize, quant_group, stored_types=checkpoint.types)
    memory.check_fits(need, device, dtype, args, memory.available_bytes(device), quantize)
    # Build the skeleton without memory, then give it this rank's slices as its weights.
    with skeleton():
        model = Transformer(args, embedding_split)
    # Each layer becomes its quantized (or bf16) products as soon as it is read.
    products = None
    if quantize is not None or stored_mode:
        products = lambda module: quantize_model(module, quantize, quant_group)  # noqa: E731
    elif bf16.usable(device, dtype):
        products = bf16.use_bf16_products
    weights = iter_rank_weights(checkpoint, where.rank, where.world_size, embedding_split, device, dtype)
    with memory.big_allocations_returned():
        assign_weights(model, weights, products)
    model.setup_caches(args.max_batch_size, args.max_seq_len)
    model.eval()
    table = ["tied embedding read from the output's int8 rows"] if getattr(model.tok_embeddings, "table", None) else []
    if stored_mode:
        return model, [describe_stored(model)] + table
    if quantize:
        return model, [describe(quantize, quant_group)] + table
    return model, [str(dtype).replace("torch.", "")] + ([cpu_kernels.describe()] if bf16.usable(device, dtype) else [])
