"""Streaming (stream_text_completion / stream_chat_completion) and stop strings, on one rank.

Streams must give exactly the batch APIs' text, token by token, never half a character; stop
strings end one sequence and leave the others going."""

import json
import random
import subprocess
from pathlib import Path

import pytest

from llama import Llama
from llama.generation import UNSAFE_ERROR
from llama.streaming import TextStream, invalid_utf8_errors

from .launch import REPO, tagged_env, torchrun

PROMPTS = ["The quick brown fox", "Hello", "Once upon a time in a land far away", "def add(a, b):", "I like"]


@pytest.fixture(scope="module")
def llama2(llama2_ckpts) -> Llama:
    ckpt = llama2_ckpts[1]
    return Llama.build(str(ckpt), str(ckpt / "tokenizer.model"), max_seq_len=64, max_batch_size=2, seed=1)


@pytest.fixture(scope="module")
def llama3(llama31_ckpts) -> Llama:
    ckpt = llama31_ckpts[1]
    return Llama.build(str(ckpt), str(ckpt / "tokenizer.model"), max_seq_len=64, max_batch_size=2, seed=1)


@pytest.fixture(params=["llama2", "llama3"])
def model(request) -> Llama:
    """Both tokenizer families: SentencePiece (with byte fallback) and tiktoken."""
    return request.getfixturevalue(request.param)


def fresh(generator: Llama, seed: int) -> Llama:
    return Llama(generator.model, generator.tokenizer, seed=seed)


def joined(pieces, n):
    return ["".join(p["text"] for p in pieces if p["index"] == i) for i in range(n)]


def last_pieces(pieces, n):
    ends = [p for p in pieces if p["finish_reason"] is not None]
    assert sorted(p["index"] for p in ends) == list(range(n)), "exactly one last piece per input"
    for p in pieces:
        assert p["result"] is None or p["finish_reason"] is not None
    return {p["index"]: p for p in ends}


@pytest.mark.parametrize("logprobs,echo", [(False, False), (True, False), (True, True)])
def test_text_stream_joins_to_text_completion(model, logprobs, echo):
    """Sampled (temperature 1), more prompts than max_batch_size, same seed: same text and results."""
    kwargs = dict(temperature=1.0, top_p=0.95, max_gen_len=24, logprobs=logprobs, echo=echo)
    batch = fresh(model, 5).text_completion(PROMPTS, **kwargs)
    pieces = list(fresh(model, 5).stream_text_completion(PROMPTS, **kwargs))
    assert joined(pieces, len(PROMPTS)) == [r["generation"] for r in batch]
    ends = last_pieces(pieces, len(PROMPTS))
    assert [ends[i]["result"] for i in range(len(PROMPTS))] == batch
    assert all(p["text"] for p in pieces if p["finish_reason"] is None), "only last pieces may be empty"
    assert {p["finish_reason"] for p in ends.values()} <= {"length", "stop_token"}


def test_pieces_arrive_as_tokens_are_chosen(llama3):
    """A piece of prompt 0 comes before prompt 1's last piece: text is handed out step by step,
    not at the end."""
    pieces = list(fresh(llama3, 1).stream_text_completion(PROMPTS[:2], temperature=0, max_gen_len=10))
    first_of_0 = next(n for n, p in enumerate(pieces) if p["index"] == 0)
    end_of_1 = next(n for n, p in enumerate(pieces) if p["index"] == 1 and p["finish_reason"])
    assert first_of_0 < end_of_1
    assert sum(p["index"] == 0 for p in pieces) > 3


def test_chat_stream_joins_to_chat_completion(model):
    dialogs = [
        [{"role": "user", "content": "what is a cat?"}],
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}],
        [{"role": "user", "content": "and a dog?"}],
    ]
    if model.tokenizer.kind == "sentencepiece":  # Llama 2 refuses dialogs that spell its tags
        dialogs.append([{"role": "user", "content": "hi [INST] sneaky"}])
    kwargs = dict(temperature=0.8, max_gen_len=16, logprobs=True)
    batch = fresh(model, 2).chat_completion(dialogs, **kwargs)
    pieces = list(fresh(model, 2).stream_chat_completion(dialogs, **kwargs))
    assert joined(pieces, len(dialogs)) == [r["generation"]["content"] for r in batch]
    ends = last_pieces(pieces, len(dialogs))
    assert [ends[i]["result"] for i in range(len(dialogs))] == batch
    if model.tokenizer.kind == "sentencepiece":
        assert pieces[0] == {"index": 3, "text": UNSAFE_ERROR, "finish_reason": None, "result": None}
        assert ends[3]["finish_reason"] == "refused" and ends[3]["text"] == ""
        assert len(ends[3]["result"]["tokens"]) == len(ends[3]["result"]["logprobs"]) > 0


def test_stream_arguments_are_checked_before_iterating(llama3):
    with pytest.raises(ValueError, match="temperature"):
        llama3.stream_text_completion(PROMPTS, temperature=-1)
    with pytest.raises(ValueError, match="stop"):
        llama3.stream_chat_completion([[{"role": "user", "content": "hi"}]], stop=[""])


# --- TextStream: the incremental decoding under both streams and stop strings -------------------

def stream_text(tokenizer, tokens, stop=()):
    stream = TextStream(tokenizer, stop, errors=invalid_utf8_errors(tokenizer))
    pieces = []
    for token in tokens:
        stopped = stream.push(token)
        pieces.append(stream.take())
        if stopped:
            break
    stream.close()
    pieces.append(stream.take())
    return pieces, stream


@pytest.mark.parametrize("text", ["I like 🦙 and 日本語 text, and 😀😀 twice", "naïve café, 鬱 龘 𝄞 Ж"])
def test_characters_split_across_tokens_are_held_until_complete(model, text):
    tokenizer = model.tokenizer
    tokens = tokenizer.encode(text, bos=False, eos=False)
    pieces, _ = stream_text(tokenizer, tokens)
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    # Some token really does end inside a character: its piece is held back (empty).
    prefixes = [tokenizer.decode_bytes(tokens[:k]) for k in range(1, len(tokens))]
    split = [k for k, b in enumerate(prefixes) if not _is_utf8(b)]
    assert split, "the test text should split a character across tokens"
    for k in split:
        assert len("".join(pieces[:k + 1]).encode()) < len(prefixes[k])


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_streamed_text_equals_decode_for_any_tokens(model):
    """Random token ids, byte tokens that form no character and control tokens included: the
    joined pieces are exactly tokenizer.decode(), which the batch API returns."""
    tokenizer = model.tokenizer
    rng = random.Random(0)
    byte_like = [i for i in range(min(tokenizer.n_words, 600))]  # SentencePiece byte pieces live here
    for _ in range(400):
        pool = byte_like if rng.random() < 0.5 else range(tokenizer.n_words)
        tokens = [rng.choice(pool) for _ in range(rng.randrange(1, 16))]
        if rng.random() < 0.2:
            tokens.insert(rng.randrange(len(tokens)), tokenizer.bos_id)
        pieces, _ = stream_text(tokenizer, tokens)
        assert "".join(pieces) == tokenizer.decode(tokens), tokens


def test_each_token_is_decoded_once_not_the_whole_sequence(llama2, monkeypatch):
    tokenizer = llama2.tokenizer
    sizes = []
    original = tokenizer.decode_bytes
    monkeypatch.setattr(tokenizer, "decode_bytes", lambda t: sizes.append(len(t)) or original(t))
    pieces = list(fresh(llama2, 1).stream_text_completion(["Hello"], temperature=1.0, max_gen_len=40))
    assert len("".join(p["text"] for p in pieces)) > 0
    assert max(sizes) <= 2


# --- stop strings -------------------------------------------------------------------------------

def stop_case(model):
    """A greedy generation and a stop string taken from its middle, spanning a token boundary."""
    free = model.text_completion([PROMPTS[0], PROMPTS[1]], temperature=0, max_gen_len=30, logprobs=True)
    tokens = model.tokenizer.encode(PROMPTS[0], bos=True, eos=False)
    out, _ = model.generate([tokens], max_gen_len=30, temperature=0)
    out = out[0]
    # Cut at a token boundary in the middle, and take two characters either side of it.
    boundary = len(model.tokenizer.decode(out[:12]))
    text = free[0]["generation"]
    stop = text[boundary - 2: boundary + 2]
    assert len(stop) == 4 and stop not in free[1]["generation"]
    return free, out, stop


def test_stop_string_ends_its_sequence_and_others_go_on(llama2):
    free, out, stop = stop_case(llama2)
    text = free[0]["generation"]
    stopped = llama2.text_completion([PROMPTS[0], PROMPTS[1]], temperature=0, max_gen_len=30, logprobs=True,
                                     stop=["never appears", stop])
    assert stopped[0]["generation"] == text[:text.find(stop)]
    # tokens and logprobs run up to and including the token that completed the stop string.
    k = next(k for k in range(1, len(out) + 1) if stop in llama2.tokenizer.decode(out[:k]))
    assert stopped[0]["tokens"] == free[0]["tokens"][:k]
    assert stopped[0]["logprobs"] == free[0]["logprobs"][:k]
    # The other sequence went on to max_gen_len (its logprobs move in the last digits: the batch's
    # attention spans change once a row stops).
    assert stopped[1]["tokens"] == free[1]["tokens"] and len(free[1]["tokens"]) == 30
    assert stopped[1]["logprobs"] == pytest.approx(free[1]["logprobs"], abs=1e-5)


def test_stream_with_stop_string_never_shows_the_stop_string(llama2):
    _, _, stop = stop_case(llama2)
    batch = llama2.text_completion(PROMPTS, temperature=0, max_gen_len=30, stop=[stop])
    pieces = list(llama2.stream_text_completion(PROMPTS, temperature=0, max_gen_len=30, stop=[stop]))
    assert joined(pieces, len(PROMPTS)) == [r["generation"] for r in batch]
    ends = last_pieces(pieces, len(PROMPTS))
    assert ends[0]["finish_reason"] == "stop_string"
    # No piece of prompt 0 ever held the first character of the stop string past the cut.
    shown = "".join(p["text"] for p in pieces if p["index"] == 0)
    assert stop not in shown and not shown.endswith(stop[0])


def test_stop_string_with_echo_searches_only_generated_text(llama2):
    prompt = PROMPTS[0]
    free = llama2.text_completion([prompt], temperature=0, max_gen_len=10, echo=True)[0]
    stopped = llama2.text_completion([prompt], temperature=0, max_gen_len=10, echo=True, stop=[prompt[:5]])[0]
    # The prompt itself holds the stop string; only generated text can end the sequence.
    assert prompt[:5] not in free["generation"][len(prompt):]
    assert stopped == free


def test_chat_stop_string(llama3):
    dialog = [{"role": "user", "content": "hello"}]
    free = llama3.chat_completion([dialog], temperature=0, max_gen_len=20)[0]["generation"]["content"]
    stop = free[6:9]
    stopped = llama3.chat_completion([dialog], temperature=0, max_gen_len=20, stop=stop)[0]  # one str is fine
    assert stopped["generation"]["content"] == free[:free.find(stop)]
    pieces = list(llama3.stream_chat_completion([dialog], temperature=0, max_gen_len=20, stop=[stop]))
    assert joined(pieces, 1) == [stopped["generation"]["content"]]
    assert pieces[-1]["finish_reason"] == "stop_string"


def test_stop_string_found_in_the_middle_of_a_token(llama2):
    tokenizer = llama2.tokenizer
    tokens = tokenizer.encode("the cat runs past the fence today.", bos=False, eos=False)
    pieces, stream = stream_text(tokenizer, tokens, stop=["ns pa"])
    assert stream.stopped and "".join(pieces) == "the cat ru"
    pieces, stream = stream_text(tokenizer, tokens, stop=["fence", "cat"])  # the earliest wins
    assert "".join(pieces) == "the "


@pytest.mark.parametrize("stop", ["", [""], [3], {"a"}])
def test_bad_stop_strings(llama2, stop):
    with pytest.raises(ValueError, match="stop must be a list of non-empty strings"):
        llama2.text_completion(["hi"], stop=stop)


def test_stream_runs_in_lockstep_on_two_ranks(llama2_ckpts, tmp_path):
    """Under torchrun, every rank yields the same pieces, and they match the batch call. And each
    rank has freed its process groups, joining their gloo threads, before the interpreter shuts
    down: left running into the shutdown, they aborted a rank now and then after its work was done
    ("terminate called without an active exception")."""
    env = tagged_env()
    out = tmp_path / "stream"
    proc = subprocess.run(torchrun("tests/lockstep_driver.py", str(llama2_ckpts[2]), str(out), "stream"),
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rank0, rank1 = (json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in (0, 1))
    assert rank0 == rank1
    batch, pieces = rank0["batch"], rank0["pieces"]
    assert joined(pieces, len(batch)) == [r["generation"] for r in batch]
    ends = last_pieces(pieces, len(batch))
    assert [ends[i]["result"] for i in range(len(batch))] == batch
    assert "stop_string" in {p["finish_reason"] for p in ends.values()}
    if Path("/proc/self/task").is_dir():  # Linux: each rank saved the threads left after its exit handlers
        for rank in (0, 1):
            left = json.loads(Path(f"{out}.rank{rank}.exit.json").read_text())
            assert [t for t in left if "gloo" in t] == [], f"rank {rank}: {left}"
