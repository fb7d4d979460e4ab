"""The speed levers that must not change outputs: the compiled decode step and prefilling ragged
prompts together (against Meta's reference loop). Greedy, fp32: tokens equal, logprobs close."""

import json
import os
import subprocess
import sys

import pytest

from torch._dynamo.utils import counters

from llama import Llama
from llama.compiling import CompiledDecode
from llama.engine import Engine, Request, SamplingParams

from .test_parallel import assert_same_results, run_example

TEXTS = ["Hi", "The capital of France is", "Once upon a time, in a land far away, there lived",
         "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,", "def fibonacci(n):", "Dear Sir or Madam,"]


def build(ckpt, **levers) -> Llama:
    return Llama.build(str(ckpt), str(ckpt / "tokenizer.model"), max_seq_len=96, max_batch_size=len(TEXTS),
                       device="cpu", dtype="fp32", **levers)


def greedy(generator: Llama, prompts, **kwargs):
    return generator.generate(prompts, max_gen_len=16, temperature=0, logprobs=True, **kwargs)


@pytest.fixture(scope="module")
def plain(llama31_ckpts):
    return build(llama31_ckpts[1])


@pytest.fixture(scope="module")
def prompts(plain):
    return [plain.tokenizer.encode(t, bos=True, eos=False) for t in TEXTS]


def assert_same(expected, actual, abs_logprob=1e-5):
    (want_tokens, want_logprobs), (got_tokens, got_logprobs) = expected, actual
    assert got_tokens == want_tokens
    for want, got in zip(want_logprobs, got_logprobs):
        assert got == pytest.approx(want, abs=abs_logprob)


@pytest.mark.parametrize("batch", [1, 6])  # 1: the one-row product path; 6: the matrix product
def test_compiled_decode_gives_the_plain_paths_tokens(llama31_ckpts, plain, prompts, batch):
    fast = build(llama31_ckpts[1], compile=True)
    assert isinstance(fast.engine.decode_step, CompiledDecode)
    expected = greedy(plain, prompts[-batch:])
    assert any(len(t) == 16 for t in expected[0])
    assert_same(expected, greedy(fast, prompts[-batch:]))


def test_after_warm_up_no_batch_width_compiles(llama31_ckpts, prompts):
    """A server warms its compiled step up before it says it is ready (issue 21): after that, no
    batch width from 1 to max_batch_size and no attended length compiles again."""
    fast = build(llama31_ckpts[1], compile=True)
    fast.decode_step.warm_up()
    graphs = counters["stats"]["unique_graphs"]
    engine = Engine(fast.model, decode_step=fast.decode_step)
    greedy_params = SamplingParams(temperature=0, max_new_tokens=3)
    for width in range(1, len(prompts) + 1):
        batch = [Request((width, n), prompts[n], greedy_params) for n in range(width)]
        engine.admit(batch)
        while engine.active:
            engine.step()
    assert counters["stats"]["unique_graphs"] == graphs


def test_padded_batch_widths_give_the_plain_paths_tokens(llama31_ckpts, plain, prompts):
    """The batch padded to a few widths, as on CUDA (one CUDA graph each): 3 and 5 rows run as 4
    and 6, placeholder rows in the free cache rows, the real rows' tokens unchanged. (The padding
    is CompiledDecode's, around the step; the step itself runs eagerly here, to save compiling.)"""
    fast = build(llama31_ckpts[1])
    padded = CompiledDecode(fast.model, pad_widths=True)
    padded.compiled = fast.model.decode_step
    fast.engine.decode_step = padded
    assert padded.widths == [1, 2, 4, 6]
    for batch in (3, 5):
        assert_same(greedy(plain, prompts[:batch]), greedy(fast, prompts[:batch]))


def test_reference_prefill_gives_the_same_tokens_and_logprobs(llama31_ckpts, plain, prompts):
    reference = build(llama31_ckpts[1], prefill="reference")
    assert len({len(p) for p in prompts}) > 3  # ragged
    for echo in (False, True):
        assert_same(greedy(plain, prompts, echo=echo), greedy(reference, prompts, echo=echo))


def test_reference_prefill_ends_sequences_like_the_plain_path(llama2_ckpts):
    """Stop tokens, max_gen_len and max_seq_len end each row at the same place in both loops."""
    plain, reference = build(llama2_ckpts[1]), build(llama2_ckpts[1], prefill="reference")
    prompts = [plain.tokenizer.encode(t, bos=True, eos=False) for t in TEXTS]
    prompts[0] = (prompts[0] * 40)[:90]  # runs into max_seq_len=96
    for max_gen_len in (0, 1, 40):
        kwargs = dict(max_gen_len=max_gen_len, temperature=0, logprobs=True)
        assert_same(plain.generate(prompts, **kwargs), reference.generate(prompts, **kwargs))


def test_every_lossless_lever_on_two_ranks_matches_one_plain_rank(llama31_ckpts, tmp_path):
    """--compile on 2 ranks (model parallel inside the compiled step) against the plain 1-rank run."""
    run_example("example_text_completion.py", llama31_ckpts[1], 1, tmp_path / "plain.json")
    run_example("example_text_completion.py", llama31_ckpts[2], 2, tmp_path / "fast.json", "--compile", "True")
    assert_same_results(json.loads((tmp_path / "plain.json").read_text()),
                        json.loads((tmp_path / "fast.json").read_text()))


@pytest.mark.parametrize("levers,message", [
    (dict(compile="yes"), "compile must be True or False"),
    (dict(quantize="int2"), "unknown quantize='int2'"),
    (dict(quantize="int4", quant_group=16), "quant_group=16 is not supported"),
    (dict(prefill="fast"), "unknown prefill='fast'"),
])
def test_bad_lever_values_are_refused(llama31_ckpts, levers, message):
    with pytest.raises(ValueError, match=message):
        build(llama31_ckpts[1], **levers)


def test_compiled_code_is_kept_in_the_per_user_cache_even_once_dynamo_is_imported(tmp_path):
    """Importing torch._dynamo fixes Inductor's cache folder (in /tmp unless set): importing llama
    points it at $XDG_CACHE_HOME/llama-runner/torchinductor first, as README says."""
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    env["XDG_CACHE_HOME"] = str(tmp_path)
    code = ("import llama, torch._dynamo\n"
            "from torch._inductor.runtime.cache_dir_utils import cache_dir\n"
            "print(cache_dir())")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == str(tmp_path / "llama-runner" / "torchinductor")
