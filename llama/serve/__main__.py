"""Serves a model over HTTP with OpenAI's API, on one process or on N torchrun ranks.

torchrun --nproc_per_node N -m llama.serve --ckpt_dir DIR --tokenizer_path FILE [--host 127.0.0.1] [--port 8000]
python -m llama.serve ...   (one process)
"""

import atexit
import os
import signal
import sys
import time
from pathlib import Path
from typing import Optional

import fire
from torch.distributed.elastic.multiprocessing.errors import record

try:
    import aiohttp  # noqa: F401
    import prometheus_client  # noqa: F401
    import pydantic  # noqa: F401
except ImportError as e:
    raise SystemExit(f"python -m llama.serve needs the `serve` extra ({e.name} is missing): "
                     f"pip install -e '.[serve]'") from None

from ..compiling import compile_by_default
from ..constraints import Vocabulary
from ..distributed import is_main_process
from ..engine import Engine
from ..generation import Llama
from .. import lockstep
from ..lockstep import DEFAULT_TIMEOUT
from ..tool_calls import FORMATS, tool_format as tool_format_for
from .cors import parse_origins
from .server import ignore_signals_until_rank0_stops, serve
from .steps import follow


@record  # under torchrun, a rank's error and traceback appear in the launcher's failure summary
def main(
    ckpt_dir: str,
    tokenizer_path: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_batch_size: int = 8,
    max_seq_len: int = 2048,
    model_name: Optional[str] = None,
    api_key: Optional[str] = None,
    max_queue: int = 64,
    device: str = "auto",
    dtype: Optional[str] = None,
    compile: Optional[bool] = None,
    quantize: Optional[str] = None,
    seed: int = 1,
    timeout: float = DEFAULT_TIMEOUT,
    cors_origins: Optional[str] = None,
    prefill_chunk: int = 256,
    prefix_reuse: bool = True,
    tool_format: str = "auto",
):
    """--host/--port: where to listen (127.0.0.1 unless told otherwise; --port 0 picks a free port).
    --max_batch_size: requests decoding together; --max_queue: requests that may wait for a slot
    (beyond them the server answers 429). --model_name: the name clients ask for (default: the
    checkpoint folder's name). --api_key (or the LLAMA_API_KEY environment variable): clients must
    send 'Authorization: Bearer KEY'. --compile: on by default (a server pays the compile once,
    before it says it is ready, for every batch width; the compiled code is kept on disk for the
    next start), --nocompile turns it off. --cors_origins: web origins whose pages may call the API, comma-separated ('*': any);
    default none (see llama/serve/cors.py). --prefill_chunk N: a prompt longer than N tokens is
    prefilled N tokens per step, between the running requests' steps, so they keep their pace
    (0: every prompt whole, at once). --noprefix_reuse: prefill every prompt whole, rather than
    starting from what the KV cache already holds of it (llama/prefixes.py). --tool_format: how the
    model writes tool calls: auto (Llama 3: json, Llama 3.1 / 3.3's JSON custom tools; ChatML:
    generic), pythonic (Llama 3.2's [f(a=1)] calls), json or generic (llama/tool_calls.py). --device, --dtype, --quantize, --seed, --timeout: as in
    example_text_completion.py."""
    if not isinstance(max_queue, int) or isinstance(max_queue, bool) or max_queue < 0:
        raise ValueError(f"max_queue must be an integer >= 0, got {max_queue!r}")
    if not isinstance(port, int) or not 0 <= port < 65536:
        raise ValueError(f"port must be an integer in [0, 65535] (0: any free port), got {port!r}")
    if isinstance(prefill_chunk, bool) or not isinstance(prefill_chunk, int) or prefill_chunk < 0:
        raise ValueError(f"prefill_chunk must be an integer >= 0 (0: prompts prefilled whole), got {prefill_chunk!r}")
    if tool_format not in ("auto", *FORMATS):
        raise ValueError(f"tool_format must be one of auto, {', '.join(FORMATS)}; got {tool_format!r}")
    origins = parse_origins(cors_origins)
    exit_on_signal_until_serving()
    api_key = api_key if api_key is not None else os.environ.get("LLAMA_API_KEY")
    # fire turns flag values that look like numbers into numbers; names and keys are text
    api_key = None if api_key is None else str(api_key)
    model_name = Path(ckpt_dir).resolve().name if model_name is None else str(model_name)
    llama = Llama.build(ckpt_dir=ckpt_dir, tokenizer_path=tokenizer_path, max_seq_len=max_seq_len,
                        max_batch_size=max_batch_size, seed=seed, device=device, dtype=dtype, timeout=timeout,
                        compile=compile_by_default(compile, long_running=True), quantize=quantize)
    tools = tool_format_for(llama.formatter, tool_format)  # before compiling: a mismatch fails at once
    if llama.decode_step is not None:  # every batch width compiled now, not in the first bursts
        started = time.perf_counter()
        print("Compiling the decode step for every batch width (seconds with a warm compile cache, "
              "minutes with a cold one)", flush=True)
        llama.decode_step.warm_up()
        print(f"Compiled in {time.perf_counter() - started:.1f} s", flush=True)
    # The server's own engine: its slots are the rows of the model's KV cache. The vocabulary (for
    # response_format) is built by the first request that needs it, on every rank.
    engine = Engine(llama.model, decode_step=llama.decode_step, prefill_chunk=prefill_chunk or None,
                    prefix_reuse=bool(prefix_reuse),
                    vocabulary=Vocabulary(llama.tokenizer, llama.model.params.vocab_size))
    if is_main_process():
        # Each token's bytes, which streaming reads: a Hugging Face tokenizer builds the table on
        # first use (~0.5 s on the event loop, holding the GIL), so the first burst's streams paid it.
        llama.tokenizer.token_pieces()
        serve(llama, engine, str(host), port, model_name, api_key, max_queue, origins, tools)
    else:
        ignore_signals_until_rank0_stops()
        follow(engine)
    exit_now()


def exit_on_signal_until_serving() -> None:
    """Until the server takes over the signals (it listens, or a rank follows rank 0), SIGTERM or
    Ctrl-C ends the process at once: nothing runs yet, and Python's own Ctrl-C could be lost (a
    KeyboardInterrupt raised inside torch.compile's warm-up was swallowed by it, and the server
    went on to serve), while SIGTERM's default left no word for the other ranks."""

    def on_signal(signum, frame) -> None:
        reason = f"{signal.Signals(signum).name} before the server was ready"
        lockstep.report(reason)
        lockstep.abort(f"rank {os.environ.get('RANK', '0')}: stopping: {reason}")

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, on_signal)


def exit_now() -> None:
    """Ends the process once this rank has left its loop, without the interpreter's teardown:
    freeing its objects one by one (the tokenizer's tables, torch's modules) took 2-5 s of a
    stop, most of an idle server's. The atexit handlers still run first (the watchdog's tells
    the other ranks that this one's silence is no failure)."""
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    fire.Fire(main)
