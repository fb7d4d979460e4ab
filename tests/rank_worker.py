"""Run by the tests under torchrun (tests/convert_helpers.run_ranks): every rank builds each job's
model, and rank 0 saves what it computed to JOBS.json.out.

A job: {"ckpt_dir", "tokenizer", "max_seq_len", "max_batch_size", "mode": "logits" | "generate",
"tokens": a list of token lists, "max_gen_len" (generate), optionally "quantize" and "quant_group"}."""

import json
import sys

import torch
import torch.distributed as dist

from llama import Llama
from llama.quantize import DEFAULT_GROUP


def main(jobs_path: str) -> None:
    results = []
    with open(jobs_path) as f:
        jobs = json.load(f)
    for job in jobs:
        generator = Llama.build(job["ckpt_dir"], job["tokenizer"], max_seq_len=job["max_seq_len"],
                                max_batch_size=job["max_batch_size"], device="cpu", dtype="fp32",
                                quantize=job.get("quantize"), quant_group=job.get("quant_group", DEFAULT_GROUP))
        if job["mode"] == "logits":
            results.append(generator.model(torch.tensor(job["tokens"]), 0))
        else:
            tokens, _ = generator.generate(job["tokens"], max_gen_len=job["max_gen_len"], temperature=0)
            results.append(tokens)
    if dist.get_rank() == 0:
        torch.save(results, jobs_path + ".out")


if __name__ == "__main__":
    main(sys.argv[1])
