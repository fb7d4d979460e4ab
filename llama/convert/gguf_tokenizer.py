"""Rebuilding a model's own tokenizer from a GGUF's metadata as a Hugging Face tokenizer.json.

A GGUF stores the vocabulary (in GPT-2's byte-level spelling), the BPE merges, each token's type
(normal, control = special, user-defined = added but not special) and the name of the
pre-tokenizer, i.e. how text is cut into words before BPE runs. The pre-tokenizer rules below
are the ones llama.cpp applies for each name.
"""

from pathlib import Path
from typing import List

from .tokenizer_files import TOKENIZER_JSON, write_tokenizer_config

CONTROL, USER_DEFINED = 3, 4  # llama.cpp's token types

# Llama 3's split: contractions, letters, numbers in runs of up to 3, punctuation, newlines, spaces.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
GPT2_NAMES = ("default", "gpt-2", "gpt2")
DIGIT_NAMES = ("smollm", "starcoder", "refact", "codeshell")  # every digit alone, then GPT-2's split
LLAMA3_NAMES = ("llama3", "llama-bpe", "llama-v3", "smaug-bpe")


def _pre_tokenizer(name: str, path: Path):
    from tokenizers import Regex, pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if name in GPT2_NAMES:
        return byte_level
    if name in DIGIT_NAMES:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if name in LLAMA3_NAMES:
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    known = ", ".join(GPT2_NAMES + DIGIT_NAMES + LLAMA3_NAMES)
    raise ValueError(
        f"{path}: its tokenizer splits text with pre-tokenizer {name!r} (tokenizer.ggml.pre), which this converter "
        f"cannot rebuild (known: {known}); convert the model's Hugging Face folder instead, which has tokenizer.json"
    )


def write_gguf_tokenizer(source, out_dir: Path) -> str:
    """Writes tokenizer.json + tokenizer_config.json for the GGUF `source`; returns "tokenizer.json"."""
    from tokenizers import AddedToken, Tokenizer, decoders, models

    path, value = source.path, source.value
    kind = value("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(
            f"{path}: its tokenizer is of type {kind!r}; only byte-level BPE vocabularies ('gpt2', as in Llama 3 "
            f"and SmolLM) are rebuilt from a GGUF. Convert the model's Hugging Face folder instead"
        )
    tokens: List[str] = value("tokenizer.ggml.tokens")
    types: List[int] = value("tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = [tuple(m.split(" ", 1)) for m in value("tokenizer.ggml.merges") or []]
    pre = value("tokenizer.ggml.pre", "default")
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError(f"{path}: its vocabulary lists some tokens twice, so ids cannot be rebuilt faithfully")

    # Llama 3 (like tiktoken) takes a word that is itself a token whole, before trying merges.
    try:
        tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=pre in LLAMA3_NAMES))
    except Exception as e:  # tokenizers raises a bare Exception, e.g. for a merge of unknown tokens
        raise ValueError(f"{path}: its vocabulary and merges do not form a BPE tokenizer ({e}); the file is "
                         f"corrupt") from None
    tokenizer.pre_tokenizer = _pre_tokenizer(pre, path)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                  for t, kind in zip(tokens, types) if kind == CONTROL])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False)
                          for t, kind in zip(tokens, types) if kind == USER_DEFINED])
    tokenizer.save(str(Path(out_dir) / TOKENIZER_JSON))

    def token(key: str):
        index = value(f"tokenizer.ggml.{key}")
        return tokens[index] if isinstance(index, int) and 0 <= index < len(tokens) else None

    write_tokenizer_config(
        out_dir, bos=token("bos_token_id"), eos=token("eos_token_id"), pad=token("padding_token_id"),
        unk=token("unknown_token_id"), add_bos=bool(value("tokenizer.ggml.add_bos_token", False)),
        chat_template=value("tokenizer.chat_template"),
        stop_tokens=[t for t in (token("eot_token_id"), token("eom_token_id")) if t is not None])
    return TOKENIZER_JSON
