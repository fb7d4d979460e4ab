"""Chat with an instruction-tuned Llama model (Llama 2 chat or Llama 3.x Instruct formats).

torchrun --nproc_per_node N example_chat_completion.py --ckpt_dir DIR --tokenizer_path DIR/tokenizer.model
(or plain `python example_chat_completion.py ...` for one process)

Add --interactive to chat at the terminal: the answers stream as they are generated.
"""

from typing import List, Optional

import fire
from torch.distributed.elastic.multiprocessing.errors import record

from llama import Dialog, Llama
from llama.compiling import compile_by_default
from llama.distributed import is_main_process
from llama.lockstep import DEFAULT_TIMEOUT, share_from_rank0
from llama.quantize import DEFAULT_GROUP
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


@record  # under torchrun, a rank's error and traceback appear in the launcher's failure summary
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
    interactive: bool = False,
    system: Optional[str] = None,
    timeout: float = DEFAULT_TIMEOUT,
    compile: Optional[bool] = None,
    quantize: Optional[str] = None,
    quant_group: int = DEFAULT_GROUP,
    prefill: str = "together",
):
    """Meta's flags, plus --top_k, --device (auto/cpu/cuda), --dtype (bf16/fp16/fp32), --seed,
    --logprobs, --output_json PATH (save the results), --interactive (chat at the terminal, with
    --system PROMPT as the system message), --timeout SECONDS (when a rank fails, the others
    exit within about this time), --compile (torch.compile the decode step: on by default with
    --interactive, where its start-up cost is paid once; --nocompile turns it off), --quantize
    int8 / int4 (weight-only quantized linear layers; --quant_group N: int4's group size, default
    32) and --prefill reference (Meta's prefill loop, for comparison)."""
    generator = Llama.build(
        ckpt_dir=ckpt_dir,
        tokenizer_path=tokenizer_path,
        max_seq_len=max_seq_len,
        max_batch_size=max_batch_size,
        seed=seed,
        device=device,
        dtype=dtype,
        timeout=timeout,
        compile=compile_by_default(compile, long_running=interactive),
        quantize=quantize,
        quant_group=quant_group,
        prefill=prefill,
    )
    if interactive:
        chat(generator, system, max_gen_len, temperature=temperature, top_p=top_p, top_k=top_k)
        return
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


HELP = "Type a message and press Enter. /reset forgets the conversation; /exit or Ctrl-D ends."


def chat(generator: Llama, system: Optional[str], max_gen_len: Optional[int], **sampling) -> None:
    """Rank 0 reads each user turn from stdin and every rank receives it; the answer streams to the
    terminal as it is generated. The history is kept, and trimmed from the oldest exchanges when it
    no longer fits max_seq_len."""
    start: Dialog = [{"role": "system", "content": system}] if system else []
    history = list(start)
    max_seq_len = generator.model.params.max_seq_len
    reserve = max_gen_len or max_seq_len // 4  # room left for the answer
    print(HELP)
    while True:
        line = share_from_rank0(read_turn)
        if line is None or line.strip() == "/exit":
            break
        if line.strip() == "/reset":
            history = list(start)
            print("[conversation cleared]")
            continue
        if not line.strip():
            continue
        dialog = fit(generator, history + [{"role": "user", "content": line}], max_seq_len - reserve)
        if dialog is None:
            print(f"[that message is too long for max_seq_len={max_seq_len}; shorten it, or start with a "
                  f"larger --max_seq_len]")
            continue
        history = dialog
        print("Assistant: ", end="", flush=True)
        reply, finish = [], None
        for piece in generator.stream_chat_completion([history], max_gen_len=max_gen_len, **sampling):
            print(piece["text"], end="", flush=True)
            reply.append(piece["text"])
            finish = piece["finish_reason"]
        print("\n")
        if finish == "refused":
            history.pop()  # keeping the message would refuse every later turn too
        else:
            history.append({"role": "assistant", "content": "".join(reply)})


def read_turn() -> Optional[str]:
    """The user's next message; None at the end of input (Ctrl-D)."""
    try:
        return input("User: ")
    except EOFError:
        print()
        return None


def fit(generator: Llama, dialog: Dialog, max_prompt: int) -> Optional[Dialog]:
    """The dialog without its oldest exchanges (user turn + answer) as far as needed for its prompt
    to take at most max_prompt tokens; a system message stays. None when even the last user turn
    alone is too long."""
    head, turns = (dialog[:1], dialog[1:]) if dialog[0]["role"] == "system" else ([], dialog)
    dropped = 0
    while len(generator.formatter.encode_dialog_prompt(head + turns)) > max_prompt:
        if len(turns) == 1:
            return None
        turns, dropped = turns[2:], dropped + 1
    if dropped:
        print(f"[the conversation no longer fits max_seq_len={generator.model.params.max_seq_len}: "
              f"dropped the {dropped} oldest exchange(s)]")
    return head + turns


if __name__ == "__main__":
    fire.Fire(main)
