"""Text completion with a pretrained Llama model.

torchrun --nproc_per_node N example_text_completion.py --ckpt_dir DIR --tokenizer_path DIR/tokenizer.model
(or plain `python example_text_completion.py ...` for one process)
"""

from typing import List, Optional

import fire
from torch.distributed.elastic.multiprocessing.errors import record

from llama import Llama
from llama.distributed import is_main_process
from llama.lockstep import DEFAULT_TIMEOUT
from llama.quantize import DEFAULT_GROUP
from llama.results import save_results

PROMPTS: List[str] = [
    # Plain prompts: the model continues the text.
    "I believe the meaning of life is",
    "Simply put, the theory of relativity states that ",
    """A brief message congratulating the team on the launch:

        Hi everyone,

        I just """,
    # Few-shot prompt: examples first, then the case to complete.
    """Translate English to French:

        sea otter => loutre de mer
        peppermint => menthe poivrée
        plush girafe => girafe peluche
        cheese =>""",
]


@record  # under torchrun, a rank's error and traceback appear in the launcher's failure summary
def main(
    ckpt_dir: str,
    tokenizer_path: str,
    temperature: float = 0.6,
    top_p: float = 0.9,
    max_seq_len: int = 128,
    max_gen_len: int = 64,
    max_batch_size: int = 4,
    top_k: Optional[int] = None,
    device: str = "auto",
    dtype: Optional[str] = None,
    seed: int = 1,
    logprobs: bool = False,
    output_json: Optional[str] = None,
    timeout: float = DEFAULT_TIMEOUT,
    compile: bool = False,
    quantize: Optional[str] = None,
    quant_group: int = DEFAULT_GROUP,
    prefill: str = "together",
):
    """Meta's flags, plus --top_k, --device (auto/cpu/cuda), --dtype (bf16/fp16/fp32), --seed,
    --logprobs (print each token's log-probability), --output_json PATH (save the results),
    --timeout SECONDS (when a rank fails, the others exit within about this time), --compile
    (torch.compile the decode step), --quantize int8 / int4 (weight-only quantized linear layers;
    --quant_group N: int4's group size, default 32) and --prefill reference (Meta's prefill loop,
    for comparison)."""
    generator = Llama.build(
        ckpt_dir=ckpt_dir,
        tokenizer_path=tokenizer_path,
        max_seq_len=max_seq_len,
        max_batch_size=max_batch_size,
        seed=seed,
        device=device,
        dtype=dtype,
        timeout=timeout,
        compile=compile,
        quantize=quantize,
        quant_group=quant_group,
        prefill=prefill,
    )
    results = generator.text_completion(
        PROMPTS, max_gen_len=max_gen_len, temperature=temperature, top_p=top_p, logprobs=logprobs, top_k=top_k,
    )
    for prompt, result in zip(PROMPTS, results):
        print(prompt)
        print(f"> {result['generation']}")
        if logprobs:
            print("  logprobs:", ", ".join(f"{t!r}:{lp:.3f}" for t, lp in zip(result["tokens"], result["logprobs"])))
        print("\n==================================\n")
    if output_json and is_main_process():
        save_results(output_json, PROMPTS, results)


if __name__ == "__main__":
    fire.Fire(main)
