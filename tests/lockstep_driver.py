"""Run by the tests under torchrun: every rank builds the model, runs one scenario and saves what
it saw to OUT.rankN.json, so the tests can compare the ranks.

python -m torch.distributed.run ... tests/lockstep_driver.py CKPT_DIR OUT SCENARIO
SCENARIO: "stream" (a stream with a stop string, and the batch call it must match) or
"bad_inputs" (calls that must raise the same error on every rank). On Linux every rank also
saves the names of the threads still running after the exit handlers, to OUT.rankN.exit.json."""

import atexit
import json
import os
import sys

import torch.distributed as dist

from llama import Llama

PROMPTS = ["The quick brown fox", "Hello", "Once upon a time"]


def stream(generator: Llama) -> dict:
    kwargs = dict(temperature=1.0, max_gen_len=16, logprobs=True, stop=[" "])
    pieces = list(generator.stream_text_completion(PROMPTS, **kwargs))
    batch = Llama(generator.model, generator.tokenizer, seed=1).text_completion(PROMPTS, **kwargs)
    return {"pieces": pieces, "batch": batch}


def bad_inputs(generator: Llama) -> dict:
    rank = dist.get_rank()
    cases = {
        "negative temperature": lambda: generator.text_completion(PROMPTS, temperature=-1),
        "prompt longer than max_seq_len": lambda: generator.text_completion(["word " * 200]),
        "different prompts per rank": lambda: generator.text_completion([f"I am rank {rank}"]),
        "too long on one rank only": lambda: generator.text_completion(["word " * (200 * rank + 1)]),
        "different max_gen_len per rank": lambda: generator.generate([[1, 2, 3]], max_gen_len=4 + rank),
        "message without content": lambda: generator.chat_completion([[{"role": "user"}]]),
        "bad stop strings": lambda: list(generator.stream_text_completion(PROMPTS, stop=[""])),
    }
    errors = {}
    for name, call in cases.items():
        try:
            call()
            errors[name] = None
        except ValueError as e:
            errors[name] = str(e)
    # After all that, the ranks are still in step.
    after = generator.text_completion(PROMPTS, temperature=0, max_gen_len=4)
    return {"errors": errors, "after": after}


def native_threads() -> list:
    """The names of this process's threads, as the kernel knows them (gloo names its own)."""
    names = []
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/comm") as f:
                names.append(f.read().strip())
        except OSError:  # ended meanwhile
            pass
    return sorted(names)


def record_threads_at_exit(path: str) -> None:
    """Registered before Llama.build registers its own exit handlers, so it runs after them: what
    is still running when the interpreter starts to shut down."""
    def record() -> None:
        with open(path, "w") as f:
            json.dump(native_threads(), f)
    atexit.register(record)


def main(ckpt: str, out: str, scenario: str) -> None:
    if os.path.isdir("/proc/self/task"):
        record_threads_at_exit(f"{out}.rank{os.environ['RANK']}.exit.json")
    generator = Llama.build(ckpt, f"{ckpt}/tokenizer.model", max_seq_len=64, max_batch_size=2,
                            device="cpu", dtype="fp32", timeout=20)
    record = {"stream": stream, "bad_inputs": bad_inputs}[scenario](generator)
    with open(f"{out}.rank{dist.get_rank()}.json", "w") as f:
        json.dump(record, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
