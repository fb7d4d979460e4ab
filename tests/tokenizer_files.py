"""Tokenizer files for tests, built or found locally (no network).

- `llama3_tokenizer_path()`: Meta's real Llama 3 tiktoken file, shipped in
  the `llama-models` PyPI package.
- `make_sentencepiece_model(dir)`: a tiny Llama 2 style SentencePiece model
  trained on the spot (Meta's Llama 2 tokenizer is not on PyPI).
"""

import importlib.resources
import io
import itertools
import random
from pathlib import Path
from typing import List

import sentencepiece


def llama3_tokenizer_path() -> Path:
    try:
        root = importlib.resources.files("llama_models")
    except ModuleNotFoundError as e:
        raise FileNotFoundError(
            "The real Llama 3 tokenizer comes from the `llama-models` package; "
            "install it with `pip install -e .[test]` (or `pip install llama-models==0.3.0`)."
        ) from e
    path = Path(str(root / "llama3" / "tokenizer.model"))
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall `llama-models==0.3.0`.")
    return path


_SUBJECTS = ["the cat", "a dog", "my friend", "the old man", "our team", "the river",
             "a small bird", "the computer", "this function", "the teacher", "every student",
             "her brother", "the server", "a quiet child", "the committee"]
_VERBS = ["runs past", "jumps over", "writes", "reads", "builds", "sees", "returns",
          "likes", "finds", "opens", "carries", "explains", "forgets", "paints", "measures"]
_OBJECTS = ["the fence", "a letter", "the book", "a program", "the window", "some code",
            "the answer", "42 apples", "the door", "a new house", "the long report",
            "three questions", "the map", "a warm coat", "the garden"]
_ENDINGS = ["today.", "quickly!", "in 1999.", "again?", "with care.", "before 10:30.",
            "(maybe).", "at home.", "very well.", "for $3.50.", "on Monday, June 5th.",
            "without a word;", "as usual: slowly.", "\"honestly\".", "- or so they say."]
_CODE = ["def add(a, b):\n    return a + b", "for i in range(10):\n\tprint(i)",
         "x = {\"key\": [1, 2, 3]}", "if (n % 2 == 0) { count++; }", "# TODO: fix #123 & #456"]


def _corpus(n: int = 1500, seed: int = 0) -> List[str]:
    """Varied English-ish sentences plus a little code, deterministic."""
    rng = random.Random(seed)
    lines = [
        f"{rng.choice(_SUBJECTS).capitalize()} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_ENDINGS)}"
        for _ in range(n)
    ]
    # Every combination once, so each word is seen often enough to merge.
    lines += [f"{s} {v} {o}." for s, v, o in itertools.islice(itertools.product(_SUBJECTS, _VERBS, _OBJECTS), 0, None, 7)]
    lines += _CODE * 20
    return lines


def make_sentencepiece_model(directory: Path, vocab_size: int = 512) -> Path:
    """Train a small BPE model shaped like Llama 2's and write `directory/tokenizer.model`."""
    buf = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()),
        model_writer=buf,
        model_type="bpe",
        vocab_size=vocab_size,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        # Same text handling as Llama 2: no normalization, keep whitespace,
        # unknown characters become UTF-8 byte pieces.
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        num_threads=1,  # deterministic
        minloglevel=2,  # quiet
    )
    path = Path(directory) / "tokenizer.model"
    path.write_bytes(buf.getvalue())
    return path
