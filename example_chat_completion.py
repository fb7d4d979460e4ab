"""Chat with an instruction-tuned Llama model (Llama 2 chat or Llama 3.x Instruct formats).

torchrun --nproc_per_node N example_chat_completion.py --ckpt_dir DIR --tokenizer_path DIR/tokenizer.model
(or plain `python example_chat_completion.py ...` for one process)
"""

from typing import List, Optional

import fire

from llama import Dialog, Llama
from llama.distributed import is_main_process
from llama.results import save_results

DIALOGS: List[Dialog] = [
    [{"role": "user", "content": "what is the recipe of mayonnaise?"}],
    [
        {"role": "user", "content": "I am going to Paris, what should I see?"},
        {
            "role": "assistant",
            "content": "Paris has the Eiffel Tower, the Louvre with the Mona Lisa, and Notre-Dame cathedral.",
        },
        {"role": "user", "content": "What is so great about #1?"},
    ],
    [
        {"role": "system", "content": "Always answer with Haiku"},
        {"role": "user", "content": "I am going to Paris, what should I see?"},
    ],
    [
        {"role": "system", "content": "Always answer with emojis"},
        {"role": "user", "content": "How to go from Beijing to NY?"},
    ],
]


def main(
    ckpt_dir: str,
    tokenizer_path: str,
    temperature: float = 0.6,
    top_p: float = 0.9,
    max_seq_len: int = 512,
    max_batch_size: int = 4,
    max_gen_len: Optional[int] = None,
    top_k: Optional[int] = None,
    device: str = "auto",
    dtype: Optional[str] = None,
    seed: int = 1,
    logprobs: bool = False,
    output_json: Optional[str] = None,
):
    """Meta's flags, plus --top_k, --device (auto/cpu/cuda), --dtype (bf16/fp16/fp32), --seed,
    --logprobs and --output_json PATH (save the results)."""
    generator = Llama.build(
        ckpt_dir=ckpt_dir,
        tokenizer_path=tokenizer_path,
        max_seq_len=max_seq_len,
        max_batch_size=max_batch_size,
        seed=seed,
        device=device,
        dtype=dtype,
    )
    results = generator.chat_completion(
        DIALOGS, max_gen_len=max_gen_len, temperature=temperature, top_p=top_p, logprobs=logprobs, top_k=top_k,
    )
    for dialog, result in zip(DIALOGS, results):
        for message in dialog:
            print(f"{message['role'].capitalize()}: {message['content']}\n")
        print(f"> {result['generation']['role'].capitalize()}: {result['generation']['content']}")
        print("\n==================================\n")
    if output_json and is_main_process():
        save_results(output_json, DIALOGS, results)


if __name__ == "__main__":
    fire.Fire(main)
