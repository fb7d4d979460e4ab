"""Meta's own Llama 3 inference (the installed `llama-models` package) as an independent
reference: its Transformer, loaded from the same consolidated checkpoint, driven by its own
generation loop (Llama3.generate, compiled from the package's source: importing its module pulls
in the vision stack). Runs on CPU in fp32, on the ranks of an existing model-parallel group.

run_job() runs ours and Meta's on the same job in this process; under torchrun (see main()) every
rank runs it and rank 0 writes the results."""

import json
import sys
import types
from pathlib import Path
from typing import Callable, Generator, List, Optional

import torch
import torch.nn.functional as F
from fairscale.nn.model_parallel.initialize import get_model_parallel_rank, get_model_parallel_world_size

from llama import Llama

from .meta_source import meta_function


def meta_model(ckpt_dir: Path, max_seq_len: int, max_batch_size: int):
    """Meta's Transformer holding this rank's shard (the checkpoint must have one shard per rank)."""
    from llama_models.llama3.args import ModelArgs
    from llama_models.llama3.model import Transformer

    params = json.loads((Path(ckpt_dir) / "params.json").read_text())
    args = ModelArgs(max_seq_len=max_seq_len, max_batch_size=max_batch_size, **params)
    shards = sorted(Path(ckpt_dir).glob("consolidated.*.pth"))
    assert len(shards) == get_model_parallel_world_size(), "one shard per rank, as Meta's loader without resharding"
    state = torch.load(shards[get_model_parallel_rank()], map_location="cpu", weights_only=True)
    model = Transformer(args)
    model.load_state_dict(state, strict=True)
    return model.float().eval()


def meta_generate(model, prompts: List[List[int]], max_gen_len: int, temperature: float, top_p: float):
    """Meta's Llama3.generate on `prompts`; returns (tokens, logprobs) per prompt as our generate()
    does: at most max_gen_len new tokens, cut before the first stop token."""
    from llama_models.datatypes import GenerationResult
    from llama_models.llama3.chat_format import LLMInput
    from llama_models.llama3.model import Transformer
    from llama_models.llama3.tokenizer import Tokenizer

    namespace = {"torch": torch, "F": F, "os": __import__("os"), "cprint": print, "Transformer": Transformer,
                 "GenerationResult": GenerationResult, "LLMInput": LLMInput, "List": List, "Optional": Optional,
                 "Callable": Callable, "Generator": Generator,
                 "sample_top_p": meta_function("llama3/generation.py", "sample_top_p", {"torch": torch})}
    generate = meta_function("llama3/generation.py", "Llama3.generate", namespace)
    tokenizer = Tokenizer.get_instance()
    llama3 = types.SimpleNamespace(args=model.params, model=model, tokenizer=tokenizer)
    tokens: List[List[int]] = [[] for _ in prompts]
    logprobs: List[List[float]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    steps = generate(llama3, [LLMInput(tokens=p) for p in prompts], temperature=temperature, top_p=top_p,
                     max_gen_len=max_gen_len, logprobs=True)
    for results in steps:
        for r in results:
            i = r.batch_idx
            if r.ignore_token or done[i]:
                continue
            if r.token in tokenizer.stop_tokens or len(tokens[i]) == max_gen_len:
                done[i] = True
                continue
            tokens[i].append(r.token)
            logprobs[i].append(r.logprobs[0])
    return tokens, logprobs


def run_job(job: dict) -> dict:
    """job: ckpt_dir, prompts (token lists), max_gen_len, temperature, top_p, seed, prefill.
    Both sides start from torch.manual_seed(seed), so sampled runs draw from the same RNG state."""
    ckpt = Path(job["ckpt_dir"])
    max_seq_len = max(map(len, job["prompts"])) + job["max_gen_len"]
    ours = Llama.build(str(ckpt), str(ckpt / "tokenizer.model"), max_seq_len=max_seq_len,
                       max_batch_size=len(job["prompts"]), device="cpu", dtype="fp32", prefill=job["prefill"])
    torch.manual_seed(job["seed"])
    our_tokens, our_logprobs = ours.generate(job["prompts"], job["max_gen_len"], temperature=job["temperature"],
                                             top_p=job["top_p"], logprobs=True)
    meta = meta_model(ckpt, max_seq_len, len(job["prompts"]))
    torch.manual_seed(job["seed"])
    meta_tokens, meta_logprobs = meta_generate(meta, job["prompts"], job["max_gen_len"], job["temperature"],
                                               job["top_p"])
    return {"ours": our_tokens, "ours_logprobs": our_logprobs, "meta": meta_tokens, "meta_logprobs": meta_logprobs}


def main(jobs_path: str) -> None:
    results = [run_job(job) for job in json.loads(Path(jobs_path).read_text())]
    if torch.distributed.get_rank() == 0:
        Path(jobs_path + ".out").write_text(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1])
