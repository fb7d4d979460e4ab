"""llama/outputs.py: a request's engine events become its tokens, text and finish reason, checked
against the tokenizer's own decode() (Meta's Llama 3 tokenizer); and the engine's admission by
Meta's reference prefill, against prefilling together."""

import pytest

from llama import Llama
from llama.engine import Engine, Finish, Request, SamplingParams, TokenEvent
from llama.outputs import RequestOutput
from llama.streaming import invalid_utf8_errors
from llama.tokenizer import Tokenizer

TEXT = "Hello there, naïve café 🦙! Stop here. And then more text follows."


@pytest.fixture(scope="module")
def tokenizer(llama3_tokenizer_path) -> Tokenizer:
    return Tokenizer(str(llama3_tokenizer_path))


def run(output: RequestOutput, tokens, last_reason=Finish.LENGTH):
    """Feeds the tokens as engine events (the last one ending the request); returns the deltas."""
    deltas = []
    for n, token in enumerate(tokens):
        output.add(TokenEvent(0, token, logprob=-0.5 * n, finish_reason=last_reason if n == len(tokens) - 1 else None))
        deltas.append(output.take())
        if output.finished:
            break
    return deltas


def test_the_pieces_join_to_decode_and_the_last_one_says_why(tokenizer):
    tokens = tokenizer.encode(TEXT, bos=False, eos=False)
    output = RequestOutput(tokenizer, [tokenizer.bos_id], errors=invalid_utf8_errors(tokenizer))
    deltas = run(output, tokens)
    assert "".join(d.text for d in deltas) == tokenizer.decode(tokens) == output.final_text()
    assert [t for d in deltas for t in d.tokens] == tokens == output.tokens
    assert [d.finish_reason for d in deltas] == [None] * (len(tokens) - 1) + [Finish.LENGTH]
    assert output.logprobs == [-0.5 * n for n in range(len(tokens))]
    assert output.final_text(echo=True) == tokenizer.decode([tokenizer.bos_id] + tokens)


def test_a_stop_string_ends_the_output_before_it_and_later_events_are_ignored(tokenizer):
    tokens = tokenizer.encode(TEXT, bos=False, eos=False)
    output = RequestOutput(tokenizer, [tokenizer.bos_id], stop=["Stop"], errors=invalid_utf8_errors(tokenizer))
    deltas = run(output, tokens)
    assert deltas[-1].finish_reason == Finish.STOP_STRING
    assert "".join(d.text for d in deltas) == output.final_text() == TEXT[:TEXT.index("Stop")]
    # Tokens run up to the one that completed the stop string.
    assert tokenizer.decode(output.tokens).startswith(TEXT[:TEXT.index("Stop") + 4])
    assert not tokenizer.decode(output.tokens[:-1]).startswith(TEXT[:TEXT.index("Stop") + 4])
    kept = list(output.tokens)
    output.add(TokenEvent(0, tokens[-1]))  # the engine ran on (a held slot): nothing changes
    assert output.tokens == kept and output.take().tokens == []


def test_a_stop_token_ends_it_without_output_and_prompt_logprobs_arrive_once(tokenizer):
    output = RequestOutput(tokenizer, [1, 2, 3], watch_text=False)
    output.add(TokenEvent(0, 5, logprob=-1.0, prompt_logprobs=[0.0, -2.0, -3.0]))
    output.add(TokenEvent(0, None, finish_reason=Finish.STOP_TOKEN))
    assert output.finish_reason == Finish.STOP_TOKEN and output.tokens == [5]
    assert output.output_tokens(echo=True) == [1, 2, 3, 5]
    assert output.output_logprobs(echo=True) == [0.0, -2.0, -3.0, -1.0]
    assert output.take().text == ""  # text not watched: nothing decoded


def test_token_texts_are_each_tokens_own_decode(tokenizer):
    tokens = tokenizer.encode(TEXT, bos=False, eos=False)
    output = RequestOutput(tokenizer, [tokenizer.bos_id])
    assert output.token_texts(tokens + tokens[:3]) == [tokenizer.decode([t]) for t in tokens + tokens[:3]]


@pytest.fixture(scope="module")
def llama(llama31_ckpts) -> Llama:
    ckpt = llama31_ckpts[1]
    return Llama.build(str(ckpt), str(ckpt / "tokenizer.model"), max_seq_len=48, max_batch_size=3,
                       device="cpu", dtype="fp32")


def test_reference_admission_feeds_prompts_a_step_at_a_time(llama):
    """Meta's prefill as an admission policy: the shortest prompt's length together, the rest one
    token per step; each request's first event comes after its whole prompt, with its prompt
    logprobs; greedy tokens and logprobs are those of prefilling whole prompts."""
    prompts = [llama.tokenizer.encode(t, bos=True, eos=False) for t in ["Hi", "The capital of France is", "1, 2,"]]
    params = SamplingParams(temperature=0, max_new_tokens=4, logprobs=True, prompt_logprobs=True)

    def decode(prefill):
        engine = Engine(llama.model)
        requests = [Request(i, p, params) for i, p in enumerate(prompts)]
        steps = [engine.admit(requests, prefill=prefill)]
        while engine.active:
            steps.append(engine.step())
        return steps

    together, reference = decode("together"), decode("reference")
    assert [e.request_id for e in together[0]] == [0, 1, 2]
    shortest = min(len(p) for p in prompts)
    for i, prompt in enumerate(prompts):
        first = next(n for n, step in enumerate(reference) if any(e.request_id == i for e in step))
        assert first == len(prompt) - shortest  # one step per prompt token past the shortest
        mine = [e for step in reference for e in step if e.request_id == i]
        theirs = [e for step in together for e in step if e.request_id == i]
        assert [e.token for e in mine] == [e.token for e in theirs]
        assert [e.logprob for e in mine] == pytest.approx([e.logprob for e in theirs], abs=1e-4)
        assert mine[0].prompt_logprobs == pytest.approx(theirs[0].prompt_logprobs, abs=1e-4)
        assert len(mine[0].prompt_logprobs) == len(prompt)
        assert mine[-1].finish_reason == Finish.LENGTH
    with pytest.raises(ValueError, match="unknown prefill"):
        Engine(llama.model).admit([Request(0, prompts[0], params)], prefill="fast")
