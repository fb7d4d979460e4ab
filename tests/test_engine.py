"""The decode engine under continuous batching: requests admitted at different times, into slots
freed by others, with their own settings, give the tokens they give alone (Llama.generate, which
the Meta-parity tests check against Meta's code)."""

import math

import pytest
import torch

from llama import Llama
from llama.engine import Engine, Request, SamplingParams

TEXTS = ["Hi", "The capital of France is", "Once upon a time, in a land far away, there lived",
         "1, 2, 3, 4, 5, 6, 7, 8,", "def fibonacci(n):", "Dear Sir or Madam,", "Q: why? A:"]
NEW = [9, 4, 12, 7, 10, 3, 8]  # new tokens per request


@pytest.fixture(scope="module")
def llama(llama31_ckpts) -> Llama:
    ckpt = llama31_ckpts[1]
    return Llama.build(str(ckpt), str(ckpt / "tokenizer.model"), max_seq_len=64, max_batch_size=4,
                       device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def prompts(llama):
    return [llama.tokenizer.encode(t, bos=True, eos=False) for t in TEXTS]


@pytest.fixture(scope="module")
def alone(llama, prompts):
    """Each prompt generated on its own: (tokens, logprobs)."""
    results = [llama.generate([p], max_gen_len=n, temperature=0, logprobs=True) for p, n in zip(prompts, NEW)]
    return [(tokens[0], logprobs[0]) for tokens, logprobs in results]


def collect(outputs, events):
    for e in events:
        tokens, logprobs, ends = outputs.setdefault(e.request_id, ([], [], []))
        if e.token is not None:
            tokens.append(e.token)
            logprobs.append(e.logprob)
        if e.finish_reason:
            ends.append(e.finish_reason)


def test_requests_joining_and_leaving_decode_as_alone(llama, prompts, alone):
    engine = Engine(llama.model)
    greedy = [SamplingParams(temperature=0, max_new_tokens=n, logprobs=True) for n in NEW]
    requests = [Request(i, p, params) for i, (p, params) in enumerate(zip(prompts, greedy))]
    outputs = {}
    collect(outputs, engine.admit(requests[:2]))  # slots 0, 1
    for _ in range(2):
        collect(outputs, engine.step())
    collect(outputs, engine.admit(requests[2:4]))  # slots 2, 3, joining at other positions
    assert engine.free_slots == 0
    with pytest.raises(ValueError, match="free slots"):
        engine.admit(requests[4:5])
    collect(outputs, engine.step())
    assert engine.release(0)  # cancelled mid-way: its slot is free at once, below running ones
    assert not engine.release(0)
    collect(outputs, engine.admit(requests[4:5]))
    while engine.active:
        collect(outputs, engine.step())
        for i in range(5, 7):  # the rest join as slots free up
            if i not in outputs and engine.free_slots:
                collect(outputs, engine.admit(requests[i:i + 1]))
    assert engine.free_slots == 4 and sorted(outputs) == list(range(7))

    tokens, logprobs, ends = outputs[0]
    assert tokens == alone[0][0][:len(tokens)] and 0 < len(tokens) < NEW[0] and ends == []
    for i in range(1, 7):
        tokens, logprobs, ends = outputs[i]
        assert tokens == alone[i][0], i
        assert logprobs == pytest.approx(alone[i][1], abs=1e-4)
        assert ends == ["length"]


def test_chunked_prefill_decodes_as_alone(llama, prompts, alone):
    """With prefill_chunk (the server's), prompts longer than the chunk are prefilled 4 tokens a
    step, before each step's decode of the running requests: every request's tokens and logprobs
    are still those it gives alone."""
    engine = Engine(llama.model, prefill_chunk=4)
    greedy = [SamplingParams(temperature=0, max_new_tokens=n, logprobs=True) for n in NEW]
    requests = [Request(i, p, params) for i, (p, params) in enumerate(zip(prompts, greedy))]
    assert len(prompts[0]) <= 4 < len(prompts[1])
    outputs = {}
    collect(outputs, engine.admit(requests[:2]))
    assert 0 in outputs and 1 not in outputs  # the short prompt at once, the long one in chunks
    steps = 0
    while 1 not in outputs:
        collect(outputs, engine.step())
        steps += 1
    assert steps == math.ceil(len(prompts[1]) / 4)
    collect(outputs, engine.admit(requests[2:4]))  # two long prompts, prefilled oldest first
    while engine.active:
        collect(outputs, engine.step())
        for i in range(4, 7):
            if i not in outputs and i not in engine and engine.free_slots:
                collect(outputs, engine.admit(requests[i:i + 1]))
    assert engine.free_slots == 4 and sorted(outputs) == list(range(7))
    for i in range(7):
        tokens, logprobs, ends = outputs[i]
        assert tokens == alone[i][0], i
        assert logprobs == pytest.approx(alone[i][1], abs=1e-4)
        assert ends == ["length"]


def run_all(engine, requests):
    outputs = {}
    collect(outputs, engine.admit(requests))
    while engine.active:
        collect(outputs, engine.step())
    return outputs


def test_prefix_reuse_gives_the_tokens_of_a_whole_prefill(llama, prompts, alone):
    """The second turn of a chat (the first turn's prompt and answer, then more) and a request
    sharing a running one's prefix start from the cache: same greedy tokens and logprobs as the
    whole prefill (alone), with the reused tokens counted."""
    engine = Engine(llama.model, prefix_reuse=True)
    params = SamplingParams(temperature=0, max_new_tokens=6, logprobs=True)
    first = run_all(engine, [Request("turn 1", prompts[2], params)])["turn 1"][0]
    second_turn = prompts[2] + first + prompts[3][1:]  # its row holds prompts[2] + first[:-1]
    plain = Engine(llama.model)
    want = run_all(plain, [Request("x", second_turn, params)])["x"]
    got = run_all(engine, [Request("turn 2", second_turn, params)])["turn 2"]
    assert got[0] == want[0] and got[1] == pytest.approx(want[1], abs=1e-4)
    assert engine.prefixes.reused_tokens == len(prompts[2]) + len(first) - 1

    # from a running request's row: copied into a free row
    outputs = {}
    collect(outputs, engine.admit([Request("a", prompts[4], params)]))
    collect(outputs, engine.step())
    before = engine.prefixes.reused_tokens
    collect(outputs, engine.admit([Request("b", prompts[4][:-1] + prompts[0][1:], params)]))
    while engine.active:
        collect(outputs, engine.step())
    assert engine.prefixes.reused_tokens - before == len(prompts[4]) - 1
    assert outputs["a"][0] == alone[4][0][:6]
    want = run_all(plain, [Request("y", prompts[4][:-1] + prompts[0][1:], params)])["y"]
    assert outputs["b"][0] == want[0] and outputs["b"][1] == pytest.approx(want[1], abs=1e-4)


def test_prefix_reuse_evicts_inside_the_batch_then_the_lowest_row(llama, prompts):
    """A new request takes a free row inside the running batch, the least recently freed first;
    with none, the lowest free row (a request alone decodes as one row)."""
    engine = Engine(llama.model, prefix_reuse=True)  # 4 rows
    outputs = {}
    lengths = {1: 1, 2: 2, 3: 3, 4: 20}  # row n - 1 frees after about n steps; prompt 4 runs on
    collect(outputs, engine.admit([Request(n, prompts[n], SamplingParams(temperature=0, max_new_tokens=k))
                                   for n, k in lengths.items()]))
    while engine.free_slots < 3:
        collect(outputs, engine.step())
    short = SamplingParams(temperature=0, max_new_tokens=1)
    collect(outputs, engine.admit([Request("new", prompts[6], short)]))  # evicts row 0 (prompt 1)
    assert engine._slot_of["new"] == 0
    reused = engine.prefixes.reused_tokens
    collect(outputs, engine.admit([Request("again 2", prompts[2], short)]))
    assert engine.prefixes.reused_tokens - reused == len(prompts[2]) - 1  # kept in row 1
    reused = engine.prefixes.reused_tokens
    collect(outputs, engine.admit([Request("again 1", prompts[1], short)]))
    assert engine.prefixes.reused_tokens - reused == 1  # evicted: only BOS found, in another row
    while engine.active:
        collect(outputs, engine.step())
    collect(outputs, engine.admit([Request("alone", prompts[5], short)]))
    assert engine._slot_of["alone"] == 0


def test_stop_tokens_end_a_request_without_output(llama, prompts, alone):
    engine = Engine(llama.model)
    stop = alone[2][0][5]  # the 6th token of request 2's greedy output
    outputs = {}
    collect(outputs, engine.admit([Request("a", prompts[2], SamplingParams(temperature=0, max_new_tokens=12,
                                                                           stop_tokens=(stop,))),
                                   Request("b", prompts[3], SamplingParams(temperature=0, max_new_tokens=7))]))
    while engine.active:
        collect(outputs, engine.step())
    first = alone[2][0].index(stop)
    assert outputs["a"][0] == alone[2][0][:first] and outputs["a"][2] == ["stop_token"]
    assert outputs["b"][0] == alone[3][0]
    assert engine.free_slots == 4


@pytest.fixture(scope="module")
def sharp(llama31_sharp_ckpt) -> Llama:
    """Peaked next-token distributions (conftest.SHARP_OUTPUT), same tokenizer as `llama`: sampled
    tokens that a last-bit change of the logits cannot move."""
    ckpt = llama31_sharp_ckpt
    return Llama.build(str(ckpt), str(ckpt / "tokenizer.model"), max_seq_len=64, max_batch_size=4,
                       device="cpu", dtype="fp32")


def test_a_seeded_request_samples_the_same_in_any_company(sharp, prompts):
    """The seeded request draws the same random numbers alone and among others; its logits may
    differ in the last bits between the two batch shapes, which the sharp model's draws do not feel
    (on the nearly flat random model they could)."""
    def run(batch):
        engine = Engine(sharp.model)
        outputs = {}
        collect(outputs, engine.admit(batch))
        while engine.active:
            collect(outputs, engine.step())
        return outputs

    seeded = Request("s", prompts[1], SamplingParams(temperature=1.0, top_p=0.95, seed=7, max_new_tokens=10))
    others = [Request(0, prompts[2], SamplingParams(temperature=0.8, max_new_tokens=12)),
              Request(1, prompts[4], SamplingParams(temperature=0, max_new_tokens=5)),
              Request(2, prompts[0], SamplingParams(temperature=1.0, top_p=0.95, seed=8, max_new_tokens=10))]
    torch.manual_seed(0)
    alone_tokens = run([seeded])["s"][0]
    torch.manual_seed(1)  # the global generator, drawn by request 0, does not matter to it
    together = run(others[:2] + [seeded] + others[2:])
    assert together["s"][0] == alone_tokens
    assert together[2][0] != alone_tokens  # another seed (and prompt) samples otherwise


def test_prompt_and_top_logprobs(llama, prompts):
    tokens, logprobs = llama.generate([prompts[1]], max_gen_len=3, temperature=0, logprobs=True, echo=True)
    engine = Engine(llama.model)
    n = len(prompts[1])
    params = SamplingParams(temperature=0, max_new_tokens=3, logprobs=True, top_logprobs=4, prompt_logprobs=True)
    first, = engine.admit([Request(0, prompts[1], params)])
    assert first.prompt_logprobs == pytest.approx(logprobs[0][:n], abs=1e-4)
    assert first.token == tokens[0][n]
    top = first.top_logprobs
    assert len(top) == 4 and top[0][0] == first.token and top[0][1] == pytest.approx(first.logprob)
    assert [lp for _, lp in top] == sorted((lp for _, lp in top), reverse=True)
    engine.release(0)
    nothing, = engine.admit([Request(1, prompts[1], SamplingParams(max_new_tokens=0, prompt_logprobs=True))])
    assert nothing.token is None and nothing.finish_reason == "length" and engine.free_slots == 4
    assert nothing.prompt_logprobs == pytest.approx(logprobs[0][:n], abs=1e-4)


def test_admit_refuses_bad_requests(llama, prompts):
    engine = Engine(llama.model)
    with pytest.raises(ValueError, match="unique"):
        engine.admit([Request(0, prompts[0]), Request(0, prompts[1])])
    with pytest.raises(ValueError, match="max_seq_len"):
        engine.admit([Request(0, [1] * 65)])
    with pytest.raises(ValueError, match="temperature"):
        engine.admit([Request(0, prompts[0], SamplingParams(temperature=-1))])
    assert engine.free_slots == 4


def test_prompt_logprobs_in_chunks_match_the_whole_log_softmax(llama, prompts, monkeypatch):
    """Prompt logprobs are projected a few positions at a time (llama/prompt_logprobs.py): here 3,
    so each prompt spans several chunks, and a chunk spans two prompts. They equal the log_softmax
    of the model's full logits over the same padded batch, computed whole, to the last bits (a
    product over 3 rows may sum in another order than one over all of them)."""
    from llama import prompt_logprobs

    vocab = llama.model.vocab_size
    monkeypatch.setattr(prompt_logprobs, "CHUNK_BYTES", 3 * 8 * vocab)
    batch = [prompts[2], prompts[0], prompts[1]]  # 13, 2 and 6 tokens
    lengths = [len(p) for p in batch]
    padded = torch.tensor([p + [0] * (max(lengths) - len(p)) for p in batch])
    every = torch.log_softmax(llama.model(padded, 0), dim=-1)  # (batch, seq, vocab), all at once
    rows_projected = []
    logits = llama.model.logits
    monkeypatch.setattr(llama.model, "logits", lambda h: rows_projected.append(h.shape[0]) or logits(h))

    asks = [SamplingParams(temperature=0, max_new_tokens=1, prompt_logprobs=True, top_logprobs=5),
            SamplingParams(temperature=0, max_new_tokens=1),  # no prompt logprobs: not projected
            SamplingParams(temperature=0, max_new_tokens=1, prompt_logprobs=True, top_logprobs=0)]
    events = Engine(llama.model).admit([Request(i, p, params) for i, (p, params) in enumerate(zip(batch, asks))])

    scored = (lengths[0] - 1) + (lengths[2] - 1)
    assert rows_projected == [3] * (scored // 3) + [scored % 3] * (scored % 3 > 0) + [3]  # + the last positions
    for row in (0, 2):
        n = lengths[row]
        want = every[row, torch.arange(n - 1), padded[row, 1:n]].tolist()
        assert events[row].prompt_logprobs[0] == 0.0
        assert events[row].prompt_logprobs[1:] == pytest.approx(want, rel=1e-6)
        assert events[row].token == int(every[row, n - 1].argmax())
    assert events[1].prompt_logprobs is None and events[2].prompt_top_logprobs is None
    top = events[0].prompt_top_logprobs
    assert top[0] is None and len(top) == lengths[0]
    values, ids = torch.topk(every[0, :lengths[0] - 1], 5)
    assert [[t for t, _ in pos] for pos in top[1:]] == ids.tolist()
    assert [lp for pos in top[1:] for _, lp in pos] == pytest.approx(values.flatten().tolist(), rel=1e-6)
