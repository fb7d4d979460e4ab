"""Protocol details real clients rely on, over HTTP against the real server: the request
lm-evaluation-harness scores multiple choice with, a request without `model`, system_fingerprint,
and CORS (off by default; with --cors_origins, headers and preflight answers for those origins)."""

import httpx
import pytest
import torch

from llama import Llama

from .serving import Server

ORIGIN = "https://evals.example.org"


@pytest.fixture(scope="module")
def ckpt(llama31_ckpts):
    return llama31_ckpts[1]


@pytest.fixture(scope="module")
def server(ckpt):
    srv = Server(ckpt, 1, "--max_seq_len", "128", "--model_name", "tiny", "--cors_origins", f"{ORIGIN},http://localhost:3000")
    yield srv
    assert srv.stop() == 0, srv.output[-3000:]
    srv.assert_nothing_left()


def post(server, path, body, **headers):
    return httpx.post(server.url + path, json=body, headers=headers, timeout=120)


def test_lm_eval_harness_multiple_choice_request(server, ckpt):
    """lm-evaluation-harness's local-completions: token-id prompt, echo, max_tokens 1, logprobs 1;
    it reads token_logprobs and top_logprobs of the prompt positions and takes max(top.values())."""
    runner = Llama.build(str(ckpt), str(ckpt / "tokenizer.model"), max_seq_len=128, max_batch_size=1,
                         device="cpu", dtype="fp32")
    context = runner.tokenizer.encode("Question: which is larger? Answer:", bos=True, eos=False)
    continuation = runner.tokenizer.encode(" the elephant", bos=False, eos=False)
    prompt = context + continuation
    reply = post(server, "/completions", {"model": "tiny", "prompt": prompt, "echo": True, "max_tokens": 1,
                                          "logprobs": 1, "temperature": 0})
    assert reply.status_code == 200, reply.text
    logprobs = reply.json()["choices"][0]["logprobs"]
    assert len(logprobs["tokens"]) == len(prompt) + 1
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    # What the harness computes, position by position past the context:
    ctx = len(context)
    chosen, tops = logprobs["token_logprobs"][ctx:-1], logprobs["top_logprobs"][ctx:-1]
    assert len(chosen) == len(continuation) and all(len(top) == 1 for top in tops)
    is_greedy = all(lp == max(top.values()) for lp, top in zip(chosen, tops))
    # The full forward's own distribution at each prompt position, as the reference.
    with torch.inference_mode():
        logits = runner.model(torch.tensor([prompt]), 0)[0].float()
    every = torch.log_softmax(logits, dim=-1)
    for position in range(1, len(prompt)):
        top = logprobs["top_logprobs"][position]
        best = int(every[position - 1].argmax())
        assert list(top) == [runner.tokenizer.decode([best])]
        assert list(top.values())[0] == pytest.approx(float(every[position - 1, best]), abs=1e-4)
        assert logprobs["token_logprobs"][position] == pytest.approx(
            float(every[position - 1, prompt[position]]), abs=1e-4)
    assert is_greedy == all(int(every[p - 1].argmax()) == prompt[p] for p in range(ctx, len(prompt)))


def test_a_request_without_model_is_served_by_the_model_here(server):
    reply = post(server, "/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3})
    assert reply.status_code == 200, reply.text
    assert reply.json()["model"] == "tiny"


def test_system_fingerprint_names_the_setup(server):
    first = post(server, "/completions", {"prompt": "Hi", "max_tokens": 2}).json()
    again = post(server, "/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}).json()
    assert first["system_fingerprint"].startswith("fp_") and first["system_fingerprint"] == again["system_fingerprint"]


def test_cors_for_the_listed_origins(server):
    base = server.url.removesuffix("/v1")
    preflight = httpx.options(server.url + "/chat/completions", headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert preflight.status_code == 204
    assert preflight.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "POST" in preflight.headers["Access-Control-Allow-Methods"]
    assert preflight.headers["Access-Control-Allow-Headers"] == "authorization, content-type"
    answer = post(server, "/completions", {"prompt": "Hi", "max_tokens": 2}, Origin="http://localhost:3000")
    assert answer.headers["Access-Control-Allow-Origin"] == "http://localhost:3000"
    streamed = post(server, "/completions", {"prompt": "Hi", "max_tokens": 2, "stream": True}, Origin=ORIGIN)
    assert streamed.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert httpx.get(base + "/health", headers={"Origin": ORIGIN}).headers["Access-Control-Allow-Origin"] == ORIGIN
    # another origin gets no CORS headers, and its preflight is refused
    other = httpx.get(base + "/health", headers={"Origin": "https://elsewhere.example"})
    assert "Access-Control-Allow-Origin" not in other.headers
    refused = httpx.options(server.url + "/completions", headers={
        "Origin": "https://elsewhere.example", "Access-Control-Request-Method": "POST"})
    assert refused.status_code == 403 and "Access-Control-Allow-Origin" not in refused.headers


def test_no_cross_origin_access_by_default(ckpt):
    srv = Server(ckpt, 1, "--max_seq_len", "64")
    try:
        preflight = httpx.options(srv.url + "/completions", headers={
            "Origin": ORIGIN, "Access-Control-Request-Method": "POST"})
        assert preflight.status_code == 403
        health = httpx.get(srv.url.removesuffix("/v1") + "/health", headers={"Origin": ORIGIN})
        assert health.status_code == 200 and "Access-Control-Allow-Origin" not in health.headers
    finally:
        assert srv.stop() == 0, srv.output[-3000:]


def test_metrics_count_what_was_sent(server):
    """GET /metrics in Prometheus's text format (read back with prometheus_client's own parser)."""
    from prometheus_client.parser import text_string_to_metric_families

    def scrape():
        reply = httpx.get(server.url.removesuffix("/v1") + "/metrics")
        assert reply.status_code == 200 and reply.headers["Content-Type"].startswith("text/plain")
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(reply.text) for s in family.samples}

    def value(samples, name, **labels):
        return samples.get((name, tuple(sorted(labels.items()))), 0.0)

    before = scrape()
    for _ in range(2):
        assert post(server, "/completions", {"prompt": [1, 2, 3, 4], "max_tokens": 5, "temperature": 0,
                                             "stop": None}).status_code == 200
    assert post(server, "/completions", {"prompt": "Hi", "max_tokens": 0}).status_code == 400
    after = scrape()
    done = value(after, "llama_requests_total", endpoint="/v1/completions", status="200") - \
        value(before, "llama_requests_total", endpoint="/v1/completions", status="200")
    assert done == 2
    assert value(after, "llama_requests_total", endpoint="/v1/completions", status="400") - \
        value(before, "llama_requests_total", endpoint="/v1/completions", status="400") == 1
    assert value(after, "llama_prompt_tokens_total") - value(before, "llama_prompt_tokens_total") == 8
    generated = value(after, "llama_generated_tokens_total") - value(before, "llama_generated_tokens_total")
    assert 2 <= generated <= 10  # at most 5 each; a stop token may end one sooner
    for histogram in ("llama_time_to_first_token_seconds", "llama_request_latency_seconds"):
        assert value(after, histogram + "_count") - value(before, histogram + "_count") == 2
    assert value(after, "llama_requests_running") == 0 and value(after, "llama_requests_waiting") == 0
    assert value(after, "llama_free_slots") >= 1
    # the second request found the first one's prompt in the cache (all but the token it prefills)
    assert value(after, "llama_prefix_prompt_tokens_total") - value(before, "llama_prefix_prompt_tokens_total") == 8
    assert value(after, "llama_prefix_reused_tokens_total") - value(before, "llama_prefix_reused_tokens_total") >= 3
