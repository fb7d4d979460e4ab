"""An OpenAI-compatible HTTP server over the model-parallel ranks, with continuous batching.

torchrun --nproc_per_node N -m llama.serve --ckpt_dir DIR --tokenizer_path FILE   (see __main__.py)

Rank 0 answers HTTP (app.py) and decides, before each engine iteration, which requests join and
leave the batch (scheduler.py); every rank carries out that plan in lockstep (steps.py)."""
