"""Llama: build a model on this rank, then generate, complete text and chat.

Names, arguments, defaults and returned structures follow Meta's reference repositories; the
additions (top_k, stop, device, dtype, timeout) are keyword-only and default to Meta's behaviour.
stream_text_completion / stream_chat_completion hand out the same text as it is generated.

The decoding itself runs in llama/engine.py (the server drives the same engine); this module
checks arguments, cuts the prompts into batches and turns tokens into results and streams.
"""

import time
from datetime import timedelta
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple, TypedDict, Union

import torch

# Llama 2's and Llama 3's generation.py define these, and callers import them from there.
from .chat_format import (B_INST, B_SYS, E_INST, E_SYS, SPECIAL_TAGS, UNSAFE_ERROR,  # noqa: F401
                          ChatFormat, Dialog, Message, Role)
from .compiling import CompiledDecode
from .distributed import init_model_parallel, resolve_device, resolve_dtype, silence_other_ranks
from .engine import PREFILL_POLICIES, Engine, Request, SamplingParams
from .loading import load_args, load_model
from .lockstep import DEFAULT_TIMEOUT, check_same_inputs, check_timeout, start_watchdog, wait_for_all_ranks
from .model import Transformer
from .outputs import RequestOutput
from .quantize import DEFAULT_GROUP
from .sampling import check_sampling, sample_top_p  # noqa: F401
from .streaming import check_stop, invalid_utf8_errors
from .tokenizer import Tokenizer


class CompletionPrediction(TypedDict, total=False):
    generation: str
    tokens: List[str]  # present when logprobs=True
    logprobs: List[float]  # present when logprobs=True


class ChatPrediction(TypedDict, total=False):
    generation: Message
    tokens: List[str]  # present when logprobs=True
    logprobs: List[float]  # present when logprobs=True


class StreamPiece(TypedDict):
    """What stream_text_completion / stream_chat_completion yield: new text of one sequence.

    index: which prompt or dialog, as its position in the list passed in.
    text: the text that follows all earlier pieces of the same index. Joined, they are that
        input's "generation" (text) or reply "content" (chat). Never ends in half a character.
    finish_reason: None while the sequence goes on. Its last piece (whose text may be "") says why
        it ended: "stop_token" (the model's end of text or turn), "stop_string" (one of `stop`
        appeared), "length" (max_gen_len or max_seq_len reached) or "refused" (a Llama 2 dialog
        holding special tags: its first piece held the refusal, the reply's content).
    result: None until that last piece, which carries what text_completion / chat_completion
        return for this input (with "tokens" and "logprobs" when logprobs=True)."""

    index: int
    text: str
    finish_reason: Optional[str]
    result: Optional[dict]


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
        timeout: float = DEFAULT_TIMEOUT,
        compile: bool = False,
        quantize: Optional[str] = None,
        quant_group: int = DEFAULT_GROUP,
        prefill: str = "together",
    ) -> "Llama":
        """Loads this rank's slice of the checkpoint in `ckpt_dir` (params.json + consolidated.NN.pth)
        and the tokenizer. Under torchrun every rank calls this; model_parallel_size defaults to the
        number of processes. A checkpoint saved as k shards loads into any rank count that splits
        the heads evenly.

        device: "auto" (CUDA if available, else CPU), "cpu", "cuda" or "cuda:N".
        dtype: None/"auto" (bf16 on GPUs that support it, fp16 on other GPUs, fp32 on CPU),
        "bf16", "fp16" or "fp32".
        timeout: seconds a rank waits for the others before it gives up: on a collective step, and
        on a rank that stopped responding (default 120). When any rank fails, in build or later,
        the others exit within about that time, naming the failed rank (see llama/lockstep.py).
        compile: torch.compile the one-token decode step (CUDA graphs on GPU). Each batch size
        compiles once, on its first step (about 45 s for a 135M model on a 2-core CPU), then
        decodes faster (3.4x there at batch 1). Greedy outputs are unchanged (logprobs may differ
        in the last digits: sums run in another order).
        quantize: weight-only quantization of every linear layer (not the embedding), on CPU
        (llama/quantize.py): "int8" (one scale per output row, a quarter of fp32's bytes) or "int4"
        (an asymmetric scale and min per group of quant_group input features, as in GGUF's Q4_1;
        about an eighth; the output layer stays int8; our kernels round activations to int8 by
        groups of 32 for the dot products, as llama.cpp does). Opt-in: results move slightly (SmolLM2's
        perplexity: +0.3% for int8, +0.5% for int4); the "Loaded" line names the mode and kernels.
        quant_group: int4's group size, 32 (default), 64, 128 or 256; each rank's slice of a layer
        must hold whole groups. A checkpoint stored quantized (llama/stored.py: a GGUF's blocks
        kept by llama.convert, or llama.convert --quantize) runs as stored, on CPU; quantize must
        then be None or the mode it was stored in.
        prefill: "together" (default) prefills every prompt of a batch in one pass; "reference"
        runs Meta's loop (prefill up to the shortest prompt, then one position per step for every
        row), kept for comparison. Greedy outputs are the same either way."""
        _positive_int("max_seq_len", max_seq_len)
        _positive_int("max_batch_size", max_batch_size)
        if not isinstance(compile, bool):
            raise ValueError(f"compile must be True or False, got {compile!r}")
        if prefill not in PREFILL_POLICIES:
            raise ValueError(f"unknown prefill={prefill!r}; use one of {PREFILL_POLICIES}")
        timeout = check_timeout(timeout)
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        # Join the other ranks first, so that whatever fails below is reported to them.
        init_model_parallel(device, model_parallel_size, timedelta(seconds=timeout))
        start_watchdog(timeout)
        silence_other_ranks()
        tokenizer = Tokenizer(tokenizer_path)
        args = load_args(Path(ckpt_dir), tokenizer, tokenizer_path, max_seq_len, max_batch_size)
        torch.manual_seed(seed)
        start = time.time()
        model, mode = load_model(Path(ckpt_dir), args, tokenizer, device, dtype, quantize, quant_group)
        decode_step = CompiledDecode(model) if compile else None
        wait_for_all_ranks()  # loading can take much longer on some ranks than the collective timeout
        mode += ["compiled decode step"] if compile else []
        print(f"Loaded in {time.time() - start:.2f} seconds ({', '.join(mode)})")
        return Llama(model, tokenizer, prefill=prefill, decode_step=decode_step)

    def __init__(self, model: Transformer, tokenizer: Tokenizer, seed: Optional[int] = None,
                 prefill: str = "together", decode_step: Optional[CompiledDecode] = None):
        """Meta's constructor (model, tokenizer). Sampling draws from torch's global generator, as in
        Meta's code: build() seeds it on every rank alike; seed (ours) reseeds it here. decode_step
        (ours): the engine's one-token step in place of the model's eager forward (see Engine)."""
        if seed is not None:
            torch.manual_seed(seed)
        self.model = model
        self.prefill = prefill
        self.tokenizer = tokenizer
        self.formatter = ChatFormat.for_tokenizer(tokenizer)
        self.device = model.norm.weight.device
        # Meta's loop samples every row of a batch until the whole batch ends; holding finished
        # requests in their slots keeps those draws, so a seed gives Meta's samples.
        self.decode_step = decode_step
        self.engine = Engine(model, hold_finished=True, decode_step=decode_step)
        self._utf8_errors = invalid_utf8_errors(tokenizer)  # for streamed text to match decode()

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
        check_same_inputs("generate() arguments", (prompt_tokens, max_gen_len, temperature, top_p, logprobs,
                                                   echo, top_k), self.device)
        sampling, outputs = self._requests(prompt_tokens, max_gen_len, temperature, top_p, top_k, logprobs, echo)
        for _ in self._decode(sampling, outputs):
            pass
        return ([o.output_tokens(echo) for o in outputs],
                [o.output_logprobs(echo) for o in outputs] if logprobs else None)

    def _check_prompts(self, prompt_tokens: Sequence[Sequence[int]]) -> None:
        params = self.model.params
        if not isinstance(prompt_tokens, (list, tuple)) or len(prompt_tokens) == 0:
            raise ValueError("no prompts given: pass a non-empty list of prompts")
        for i, tokens in enumerate(prompt_tokens):
            if not isinstance(tokens, (list, tuple)) or not all(
                    isinstance(t, int) and not isinstance(t, bool) for t in tokens):
                raise ValueError(f"prompt {i} must be a list of int token ids (tokenizer.encode's output), "
                                 f"got {str(tokens)[:80]}")
            if len(tokens) == 0:
                raise ValueError(f"prompt {i} is empty; every prompt needs at least one token")
            if len(tokens) > params.max_seq_len:
                raise ValueError(
                    f"prompt {i} is {len(tokens)} tokens long, more than max_seq_len={params.max_seq_len}; "
                    f"shorten it or build with a larger max_seq_len"
                )
            if min(tokens) < 0 or max(tokens) >= params.vocab_size:
                raise ValueError(f"prompt {i} holds token ids outside [0, {params.vocab_size})")

    def _requests(self, prompt_tokens, max_gen_len, temperature, top_p, top_k, logprobs: bool, echo: bool,
                  stop: Sequence[str] = (), watch_text: bool = False) -> Tuple[SamplingParams, List[RequestOutput]]:
        """Checks the arguments; returns how to sample and one RequestOutput per prompt.
        watch_text: follow each output's text as it grows (streaming, stop strings)."""
        check_sampling(temperature, top_p, top_k)
        if max_gen_len is None:
            max_gen_len = self.model.params.max_seq_len - 1
        if not isinstance(max_gen_len, int) or isinstance(max_gen_len, bool) or max_gen_len < 0:
            raise ValueError(f"max_gen_len must be an integer >= 0, got {max_gen_len!r}")
        self._check_prompts(prompt_tokens)
        sampling = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=max_gen_len,
                                  logprobs=logprobs, prompt_logprobs=logprobs and echo,
                                  stop_tokens=tuple(self.tokenizer.stop_tokens))
        outputs = [RequestOutput(self.tokenizer, prompt, stop=stop, watch_text=watch_text, echo=echo,
                                 errors=self._utf8_errors) for prompt in prompt_tokens]
        return sampling, outputs

    def _decode(self, sampling: SamplingParams, outputs: List[RequestOutput]) -> Iterator[range]:
        """The decoding loop that generate, the completions and their streams all run: batches of at
        most max_batch_size requests through the engine, one batch after another, each admitted
        whole (under this Llama's prefill policy) and stepped until every output has finished. A
        finished request stays in its slot (see Engine) until its batch ends. Yields the indices
        of the current batch after every step."""
        batch_size = self.model.params.max_batch_size
        for first in range(0, len(outputs), batch_size):
            batch = range(first, min(first + batch_size, len(outputs)))
            try:
                events = self.engine.admit([Request(i, outputs[i].prompt, sampling) for i in batch],
                                           prefill=self.prefill)
                while True:
                    for event in events:
                        outputs[event.request_id].add(event)
                    yield batch
                    if all(outputs[i].finished for i in batch):
                        break
                    events = self.engine.step()
            finally:  # also when a stream is dropped half-way
                for i in batch:
                    self.engine.release(i)

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
        stop: Optional[List[str]] = None,
    ) -> List[CompletionPrediction]:
        """Completes each prompt string. Returns one {"generation": str} per prompt, in order, plus
        "tokens" (each token's text) and "logprobs" when logprobs=True. max_gen_len defaults to
        max_seq_len - 1.

        stop (keyword-only): strings that end a sequence as soon as its generated text contains one;
        "generation" then ends just before the first of them, while "tokens" and "logprobs" run up
        to and including the token that completed it. Other sequences go on."""
        return _results(self.stream_text_completion(prompts, temperature, top_p, max_gen_len, logprobs, echo,
                                                     top_k=top_k, stop=stop))

    def stream_text_completion(
        self,
        prompts: List[str],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        logprobs: bool = False,
        echo: bool = False,
        *,
        top_k: Optional[int] = None,
        stop: Optional[List[str]] = None,
    ) -> Iterator[StreamPiece]:
        """text_completion, handed out as it is generated: yields StreamPiece dicts (index, text,
        finish_reason, result) in the order the text appears; see StreamPiece. With the same
        arguments and seed, the pieces of each index join to text_completion's "generation", and
        its last piece's "result" is text_completion's result for that prompt.

        The arguments are checked at once; generation runs while the iterator is consumed. Under
        torchrun every rank must consume the stream the same way (all of it, or stop at the same
        piece), as with any collective step."""
        sampling, outputs = self._text_requests(prompts, temperature, top_p, max_gen_len, logprobs, echo, top_k, stop)
        return self._stream(sampling, outputs, None, lambda i: self._completion(outputs[i], logprobs, echo))

    def _text_requests(self, prompts, temperature, top_p, max_gen_len, logprobs, echo, top_k, stop):
        check_same_inputs("text_completion() arguments", (prompts, temperature, top_p, max_gen_len, logprobs, echo,
                                                          top_k, stop), self.device)
        if isinstance(prompts, str):
            raise ValueError(f"prompts must be a list of strings, got one string; pass [{prompts!r}]")
        if not isinstance(prompts, (list, tuple)) or len(prompts) == 0:
            raise ValueError("no prompts given: pass a non-empty list of strings")
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str) or prompt == "":
                raise ValueError(f"prompt {i} must be a non-empty string, got {prompt!r}")
        stops = check_stop(stop)
        prompt_tokens = [self.tokenizer.encode(p, bos=True, eos=False) for p in prompts]
        return self._requests(prompt_tokens, max_gen_len, temperature, top_p, top_k, logprobs, echo, stops,
                              watch_text=True)

    def chat_completion(
        self,
        dialogs: List[Dialog],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        logprobs: bool = False,
        *,
        top_k: Optional[int] = None,
        stop: Optional[List[str]] = None,
    ) -> List[ChatPrediction]:
        """Answers each dialog (a list of {"role", "content"} messages ending with a user turn) in the
        model's chat format. Returns one {"generation": {"role": "assistant", "content": str}} per
        dialog, plus "tokens" and "logprobs" when logprobs=True. stop: as in text_completion."""
        return _results(self.stream_chat_completion(dialogs, temperature, top_p, max_gen_len, logprobs,
                                                     top_k=top_k, stop=stop))

    def stream_chat_completion(
        self,
        dialogs: List[Dialog],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        logprobs: bool = False,
        *,
        top_k: Optional[int] = None,
        stop: Optional[List[str]] = None,
    ) -> Iterator[StreamPiece]:
        """chat_completion, handed out as it is generated, like stream_text_completion: the pieces
        of each index join to the reply's "content". A refused dialog (Llama 2 special tags) gets
        its refusal text as one piece before any other; its generation runs unseen, as in Meta's
        code, and its last piece (text "", finish_reason "refused") comes when that ends."""
        refusals, (sampling, outputs) = self._chat_requests(dialogs, temperature, top_p, max_gen_len, logprobs,
                                                            top_k, stop)
        return self._stream(sampling, outputs, refusals,
                            lambda i: self._completion(outputs[i], logprobs, echo=False, chat=True,
                                                       content=refusals[i]))

    def _chat_requests(self, dialogs, temperature, top_p, max_gen_len, logprobs, top_k, stop):
        """The refusal text of each dialog (None for the others) and a sequence for every dialog:
        like Meta's Llama 2 code, a refused dialog still runs, and only its reply text is replaced
        (its tokens and logprobs are those generated)."""
        check_same_inputs("chat_completion() arguments", (dialogs, temperature, top_p, max_gen_len, logprobs,
                                                          top_k, stop), self.device)
        if not isinstance(dialogs, (list, tuple)) or len(dialogs) == 0:
            raise ValueError("no dialogs given: pass a non-empty list of dialogs")
        if isinstance(dialogs[0], dict):
            raise ValueError("dialogs must be a list of dialogs, each a list of messages; got one dialog: pass [dialog]")
        stops = check_stop(stop)
        refusals = [self.formatter.refusal(d) for d in dialogs]
        encoded = [self.formatter.encode_dialog_prompt(d) for d in dialogs]
        return refusals, self._requests(encoded, max_gen_len, temperature, top_p, top_k, logprobs, False, stops,
                                        watch_text=True)

    def _stream(self, sampling: SamplingParams, outputs: List[RequestOutput], refusals,
                result_of) -> Iterator[StreamPiece]:
        """Runs the decoding loop, handing out each output's newly settled text after every step;
        result_of(index) gives the result carried by an output's last piece. refusals: None, or
        per index the text shown instead of that output's own (see stream_chat_completion)."""
        refusals = refusals or [None] * len(outputs)
        for i, refusal in enumerate(refusals):
            if refusal is not None:
                yield StreamPiece(index=i, text=refusal, finish_reason=None, result=None)
        ended = set()
        for batch in self._decode(sampling, outputs):
            for i in batch:
                if i in ended:
                    continue
                delta = outputs[i].take()
                text, reason = delta.text, delta.finish_reason
                if refusals[i] is not None:
                    text, reason = "", "refused"
                if outputs[i].finished:
                    ended.add(i)
                    yield StreamPiece(index=i, text=text, finish_reason=reason, result=result_of(i))
                elif text:
                    yield StreamPiece(index=i, text=text, finish_reason=None, result=None)

    def _completion(self, output: RequestOutput, logprobs: bool, echo: bool, chat: bool = False,
                    content: Optional[str] = None):
        """What text_completion / chat_completion return for one finished output; content: the
        text to return instead of the generated one (a refusal)."""
        text = content if content is not None else output.final_text(echo)
        result = {"generation": {"role": "assistant", "content": text} if chat else text}
        if logprobs:
            result["tokens"] = output.token_texts(output.output_tokens(echo))
            result["logprobs"] = output.output_logprobs(echo)
        return result


def _results(pieces: Iterator[StreamPiece]) -> list:
    """Runs a stream to its end; returns each index's result in order (what the non-streaming
    methods return)."""
    results = {piece["index"]: piece["result"] for piece in pieces if piece["result"] is not None}
    return [results[i] for i in range(len(results))]
