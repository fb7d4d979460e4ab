"""Llama: build a model on this rank, then generate, complete text and chat.

Names, arguments, defaults and returned structures follow Meta's reference repositories; the
additions (top_k, device, dtype) are keyword-only and default to Meta's behaviour.
"""

import dataclasses
import time
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, TypedDict, Union

import torch
import torch.nn.functional as F

from .args import load_params
from .chat_format import ChatFormat, Dialog, Message
from .checkpoint import ShardedCheckpoint, check_world_size, load_rank_weights
from .distributed import init_model_parallel, placement, resolve_device, resolve_dtype, silence_other_ranks
from .model import Transformer, skeleton
from .sampling import check_sampling, sample_next
from .tokenizer import Tokenizer


class CompletionPrediction(TypedDict, total=False):
    generation: str
    tokens: List[str]  # present when logprobs=True
    logprobs: List[float]  # present when logprobs=True


class ChatPrediction(TypedDict, total=False):
    generation: Message
    tokens: List[str]  # present when logprobs=True
    logprobs: List[float]  # present when logprobs=True


def _positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


class Llama:
    @staticmethod
    def build(
        ckpt_dir: str,
        tokenizer_path: str,
        max_seq_len: int,
        max_batch_size: int,
        model_parallel_size: Optional[int] = None,
        seed: int = 1,
        *,
        device: Union[str, torch.device] = "auto",
        dtype: Union[None, str, torch.dtype] = None,
    ) -> "Llama":
        """Loads this rank's slice of the checkpoint in `ckpt_dir` (params.json + consolidated.NN.pth)
        and the tokenizer. Under torchrun every rank calls this; model_parallel_size defaults to the
        number of processes. A checkpoint saved as k shards loads into any rank count that splits
        the heads evenly.

        device: "auto" (CUDA if available, else CPU), "cpu", "cuda" or "cuda:N".
        dtype: None/"auto" (bf16 on GPUs that support it, fp16 on other GPUs, fp32 on CPU),
        "bf16", "fp16" or "fp32"."""
        _positive_int("max_seq_len", max_seq_len)
        _positive_int("max_batch_size", max_batch_size)
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        tokenizer = Tokenizer(tokenizer_path)
        args = load_params(Path(ckpt_dir), max_seq_len=max_seq_len, max_batch_size=max_batch_size)
        if args.vocab_size == -1:
            args = dataclasses.replace(args, vocab_size=tokenizer.n_words)
        elif args.vocab_size != tokenizer.n_words:
            raise ValueError(
                f"params.json says vocab_size={args.vocab_size} but the tokenizer {tokenizer_path} has "
                f"{tokenizer.n_words} tokens; pass the tokenizer that belongs to this checkpoint"
            )

        init_model_parallel(device, model_parallel_size)
        silence_other_ranks()
        torch.manual_seed(seed)
        start = time.time()
        where = placement(device, dtype)
        check_world_size(args, where.world_size)
        checkpoint = ShardedCheckpoint(Path(ckpt_dir), args)
        embedding_split = checkpoint.embedding_split_on_disk or (
            "dim" if tokenizer.kind == "sentencepiece" else "vocab")
        # Build the skeleton without memory, then give it this rank's slices as its weights.
        with skeleton():
            model = Transformer(args, embedding_split)
        weights = load_rank_weights(checkpoint, where.rank, where.world_size, embedding_split, device, dtype)
        model.load_state_dict(weights, strict=True, assign=True)
        model.setup_caches(max_batch_size, max_seq_len)
        model.eval()
        print(f"Loaded in {time.time() - start:.2f} seconds")
        return Llama(model, tokenizer, seed=seed)

    def __init__(self, model: Transformer, tokenizer: Tokenizer, seed: int = 1):
        self.model = model
        self.tokenizer = tokenizer
        self.formatter = ChatFormat.for_tokenizer(tokenizer)
        self.device = model.norm.weight.device
        # Every rank seeds its own generator identically, so all ranks sample the same tokens.
        self.generator = torch.Generator(device=self.device).manual_seed(seed)

    @torch.inference_mode()
    def generate(
        self,
        prompt_tokens: List[List[int]],
        max_gen_len: int,
        temperature: float = 0.6,
        top_p: float = 0.9,
        logprobs: bool = False,
        echo: bool = False,
        *,
        top_k: Optional[int] = None,
    ) -> Tuple[List[List[int]], Optional[List[List[float]]]]:
        """Continues each token list. Returns (tokens, logprobs): per prompt, the generated tokens
        (prompt first when echo), cut before the first stop token and never beyond max_gen_len new
        tokens or max_seq_len in total; logprobs is None unless asked for, else the log-probability
        of each returned token (0.0 for the first prompt token when echo).

        temperature 0 is greedy; top_p keeps the smallest set of likely tokens reaching p; top_k
        (keyword-only, None or 0 = off) keeps the k most likely. More prompts than max_batch_size
        run in consecutive batches."""
        params = self.model.params
        check_sampling(temperature, top_p, top_k)
        if max_gen_len is None:
            max_gen_len = params.max_seq_len - 1
        if not isinstance(max_gen_len, int) or max_gen_len < 0:
            raise ValueError(f"max_gen_len must be an integer >= 0, got {max_gen_len!r}")
        self._check_prompts(prompt_tokens)
        out_tokens, out_logprobs = [], []
        for first in range(0, len(prompt_tokens), params.max_batch_size):
            batch = prompt_tokens[first:first + params.max_batch_size]
            tokens, lps = self._generate_batch(batch, max_gen_len, temperature, top_p, top_k, logprobs, echo)
            out_tokens += tokens
            out_logprobs += lps
        return out_tokens, (out_logprobs if logprobs else None)

    def _check_prompts(self, prompt_tokens: Sequence[Sequence[int]]) -> None:
        params = self.model.params
        if not isinstance(prompt_tokens, (list, tuple)) or len(prompt_tokens) == 0:
            raise ValueError("no prompts given: pass a non-empty list of prompts")
        for i, tokens in enumerate(prompt_tokens):
            if len(tokens) == 0:
                raise ValueError(f"prompt {i} is empty; every prompt needs at least one token")
            if len(tokens) > params.max_seq_len:
                raise ValueError(
                    f"prompt {i} is {len(tokens)} tokens long, more than max_seq_len={params.max_seq_len}; "
                    f"shorten it or build with a larger max_seq_len"
                )
            if min(tokens) < 0 or max(tokens) >= params.vocab_size:
                raise ValueError(f"prompt {i} holds token ids outside [0, {params.vocab_size})")

    def _generate_batch(self, prompts, max_gen_len, temperature, top_p, top_k, want_logprobs, echo):
        max_seq_len = self.model.params.max_seq_len
        lengths = [len(p) for p in prompts]
        budgets = [min(max_gen_len, max_seq_len - n) for n in lengths]  # new tokens each row may add
        tokens = torch.zeros((len(prompts), max(lengths)), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            tokens[row, :len(prompt)] = torch.tensor(prompt, dtype=torch.long)
        tokens = tokens.to(self.device)
        last_index = torch.tensor(lengths, device=self.device) - 1

        # Prefill every prompt at once; right padding is never attended by real tokens.
        prompt_logprobs = None
        if want_logprobs and echo:
            logits = self.model(tokens, 0)
            prompt_logprobs = _token_logprobs(logits[:, :-1], tokens[:, 1:]).tolist()
            last = logits[torch.arange(len(prompts)), last_index]
        else:
            last = self.model(tokens, 0, last_index=last_index)

        generated: List[List[int]] = [[] for _ in prompts]
        gen_logprobs: List[List[float]] = [[] for _ in prompts]
        done = [budget == 0 for budget in budgets]
        stop_tokens = set(self.tokenizer.stop_tokens)
        while not all(done):
            next_tokens = sample_next(last, temperature, top_p, top_k, self.generator)
            chosen = next_tokens.tolist()
            chosen_logprobs = _token_logprobs(last, next_tokens).tolist() if want_logprobs else None
            for row, token in enumerate(chosen):
                if done[row]:
                    continue
                if token in stop_tokens:
                    done[row] = True
                    continue
                generated[row].append(token)
                if want_logprobs:
                    gen_logprobs[row].append(chosen_logprobs[row])
                done[row] = len(generated[row]) == budgets[row]
            if all(done):
                break
            # Each row feeds its newest token at its own position; finished rows idle in place.
            positions = [min(n + len(g) - 1, max_seq_len - 1) for n, g in zip(lengths, generated)]
            feed = [g[-1] if g else p[-1] for g, p in zip(generated, prompts)]
            last = self.model(torch.tensor(feed, device=self.device).unsqueeze(1),
                              torch.tensor(positions), last_index=torch.zeros(len(prompts), dtype=torch.long))

        out_tokens, out_logprobs = [], []
        for row, prompt in enumerate(prompts):
            out_tokens.append((list(prompt) if echo else []) + generated[row])
            if want_logprobs:
                prefix = [0.0] + prompt_logprobs[row][:len(prompt) - 1] if echo else []
                out_logprobs.append(prefix + gen_logprobs[row])
        return out_tokens, out_logprobs

    def text_completion(
        self,
        prompts: List[str],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        logprobs: bool = False,
        echo: bool = False,
        *,
        top_k: Optional[int] = None,
    ) -> List[CompletionPrediction]:
        """Completes each prompt string. Returns one {"generation": str} per prompt, in order, plus
        "tokens" (each token's text) and "logprobs" when logprobs=True. max_gen_len defaults to
        max_seq_len - 1."""
        if not isinstance(prompts, (list, tuple)) or len(prompts) == 0:
            raise ValueError("no prompts given: pass a non-empty list of strings")
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str) or prompt == "":
                raise ValueError(f"prompt {i} must be a non-empty string, got {prompt!r}")
        prompt_tokens = [self.tokenizer.encode(p, bos=True, eos=False) for p in prompts]
        tokens, lps = self.generate(prompt_tokens, max_gen_len, temperature, top_p, logprobs, echo, top_k=top_k)
        return [self._prediction(self.tokenizer.decode(t), t, lps[i] if logprobs else None)
                for i, t in enumerate(tokens)]

    def chat_completion(
        self,
        dialogs: List[Dialog],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        logprobs: bool = False,
        *,
        top_k: Optional[int] = None,
    ) -> List[ChatPrediction]:
        """Answers each dialog (a list of {"role", "content"} messages ending with a user turn) in the
        model's chat format. Returns one {"generation": {"role": "assistant", "content": str}} per
        dialog, plus "tokens" and "logprobs" when logprobs=True."""
        if not isinstance(dialogs, (list, tuple)) or len(dialogs) == 0:
            raise ValueError("no dialogs given: pass a non-empty list of dialogs")
        refusals = [self.formatter.refusal(d) for d in dialogs]
        encoded = [self.formatter.encode_dialog_prompt(d) for d in dialogs]
        to_run = [i for i, refusal in enumerate(refusals) if refusal is None]
        results: List[ChatPrediction] = [
            self._prediction(refusal, [], [] if logprobs else None, chat=True) for refusal in refusals]
        if to_run:
            tokens, lps = self.generate([encoded[i] for i in to_run], max_gen_len, temperature, top_p,
                                        logprobs, top_k=top_k)
            for j, i in enumerate(to_run):
                results[i] = self._prediction(self.tokenizer.decode(tokens[j]), tokens[j],
                                              lps[j] if logprobs else None, chat=True)
        return results

    def _prediction(self, text, tokens, logprobs, chat: bool = False):
        result = {"generation": {"role": "assistant", "content": text} if chat else text}
        if logprobs is not None:
            result["tokens"] = [self.tokenizer.decode([t]) for t in tokens]
            result["logprobs"] = logprobs
        return result


def _token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(token) under the raw (untempered) logits, as Meta reports it."""
    return torch.gather(F.log_softmax(logits.float(), dim=-1), -1, tokens.unsqueeze(-1)).squeeze(-1)
