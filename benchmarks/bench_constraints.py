"""What constrained decoding costs per step at batch 16: computing the token masks, applying them to
the (16, vocab) logits, and advancing the grammars, for llguidance (what llama/constraints.py uses,
measured through it) and, when installed, xgrammar and outlines-core, on one JSON schema.

    python benchmarks/bench_constraints.py --tokenizer_path FILE [--vocab_size N] [--steps 60]
        [--libraries llguidance,xgrammar,outlines-core]

Each library drives 16 grammars with random logits (argmax of the masked logits), restarting a
grammar once it is complete. Times are medians over the steps, on one torch thread.
(outlines-core builds a token index per schema: minutes for a 128k vocabulary.)"""

import argparse
import json
import statistics
import time

import torch

from llama.constraints import Constraint, Grammar, Vocabulary, masked_logits
from llama.tokenizer import Tokenizer

BATCH = 16
SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 40}, "age": {"type": "integer", "minimum": 0},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 5},
    "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                                 "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                "required": ["city", "zip"], "additionalProperties": False},
    "status": {"enum": ["active", "inactive", "banned"]}},
    "required": ["name", "age", "tags", "address", "status"], "additionalProperties": False}


def timed(f):
    start = time.perf_counter()
    out = f()
    return out, time.perf_counter() - start


def drive(steps, vocab_size, masks, apply, advance):
    """masks() -> (16, words) int32; apply(logits, masks) -> logits; advance(tokens). Median seconds."""
    generator = torch.Generator().manual_seed(0)
    cost = {"mask": [], "apply": [], "advance": []}
    for _ in range(steps):
        mask, t_mask = timed(masks)
        logits = torch.randn(BATCH, vocab_size, generator=generator)
        logits, t_apply = timed(lambda: apply(logits, mask))
        tokens = logits.argmax(-1).tolist()
        _, t_advance = timed(lambda: advance(tokens))
        for name, t in zip(cost, (t_mask, t_apply, t_advance)):
            cost[name].append(t)
    return {name: statistics.median(values) for name, values in cost.items()}


def ours(apply_logits, mask):
    return masked_logits(apply_logits, range(BATCH), list(mask))


def bench_llguidance(tokenizer, vocab_size, steps):
    vocabulary = Vocabulary(tokenizer, vocab_size)
    _, setup = timed(lambda: vocabulary.library_tokenizer)
    grammar, compile_s = timed(lambda: Grammar.json_schema(SCHEMA))
    rows = [Constraint(grammar, vocabulary) for _ in range(BATCH)]
    stops = set(tokenizer.stop_tokens)

    def advance(tokens):
        for i, token in enumerate(tokens):
            if token in stops:
                rows[i] = Constraint(grammar, vocabulary)
            else:
                assert rows[i].advance(token), rows[i].error
    return setup, compile_s, drive(steps, vocab_size, lambda: torch.stack([c.mask() for c in rows]), ours, advance)


def bench_xgrammar(tokenizer, vocab_size, steps):
    import xgrammar as xgr

    specials = set(tokenizer.special_tokens.values())
    pieces = [b"" if i in specials else p for i, p in enumerate(tokenizer.token_pieces())]
    info, setup = timed(lambda: xgr.TokenizerInfo(pieces, xgr.VocabType.RAW, vocab_size=vocab_size,
                                                  stop_token_ids=list(tokenizer.stop_tokens)))
    compiler = xgr.GrammarCompiler(info, cache_enabled=False)
    grammar, compile_s = timed(lambda: compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False))
    rows = [xgr.GrammarMatcher(grammar) for _ in range(BATCH)]
    batch, bitmask = xgr.BatchGrammarMatcher(), xgr.allocate_token_bitmask(BATCH, vocab_size)

    def masks():
        batch.batch_fill_next_token_bitmask(rows, bitmask)
        return bitmask

    def advance(tokens):
        for i, token in enumerate(tokens):
            if rows[i].is_terminated():
                rows[i] = xgr.GrammarMatcher(grammar)
            else:
                assert rows[i].accept_token(token)
    return setup, compile_s, drive(steps, vocab_size, masks, ours, advance)


def bench_outlines_core(tokenizer, vocab_size, steps):
    import outlines_core

    specials, eos = set(tokenizer.special_tokens.values()), tokenizer.stop_tokens[0]
    by_bytes = {}
    for i, piece in enumerate(tokenizer.token_pieces()):
        if piece and i not in specials:
            by_bytes.setdefault(piece, []).append(i)
    vocabulary, setup = timed(lambda: outlines_core.Vocabulary(eos, by_bytes))
    regex = outlines_core.json_schema.build_regex_from_schema(json.dumps(SCHEMA), whitespace_pattern="")
    index, compile_s = timed(lambda: outlines_core.Index(regex, vocabulary))
    rows = [outlines_core.Guide(index) for _ in range(BATCH)]
    bitmask = torch.zeros(BATCH, (vocab_size + 31) // 32, dtype=torch.int32)

    def masks():
        for guide, row in zip(rows, bitmask):
            guide.write_mask_into(row.data_ptr(), row.numel(), 4)
        return bitmask

    def advance(tokens):
        for i, token in enumerate(tokens):
            if token == eos or rows[i].is_finished():
                rows[i] = outlines_core.Guide(index)
            else:
                rows[i].advance(token)
    return setup, compile_s, drive(steps, vocab_size, masks, ours, advance)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer_path", required=True)
    parser.add_argument("--vocab_size", type=int, default=None, help="the model's logits (default: the tokenizer's)")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--libraries", default="llguidance,xgrammar")
    args = parser.parse_args()
    torch.set_num_threads(1)
    tokenizer = Tokenizer(args.tokenizer_path)
    vocab_size = args.vocab_size or tokenizer.n_words
    benches = {"llguidance": bench_llguidance, "xgrammar": bench_xgrammar, "outlines-core": bench_outlines_core}
    print(f"batch {BATCH}, vocab {vocab_size}; medians per step in ms")
    for name in args.libraries.split(","):
        try:
            setup, compile_s, cost = benches[name](tokenizer, vocab_size, args.steps)
        except ImportError as e:
            print(f"{name}: not installed ({e})")
            continue
        print(f"{name}: vocabulary {setup:.2f} s, schema compiled in {compile_s * 1e3:.1f} ms; masks "
              f"{cost['mask'] * 1e3:.2f}, applied {cost['apply'] * 1e3:.2f}, advanced {cost['advance'] * 1e3:.2f}",
              flush=True)


if __name__ == "__main__":
    main()
