"""The server under pressure and at its end, on 2 CPU ranks: beyond its queue it answers 429 at
once; a client that goes away frees its slot; SIGTERM ends every rank with nothing left running;
a killed rank ends the server, answering the open request with an error, and frees the port."""

import socket
from urllib.parse import urlparse

import openai
import pytest

from .serving import Server

LONG = 1500  # new tokens: a request that keeps its slot while the test looks around


def stream(client, max_tokens=LONG, **options):
    return client.completions.create(model="tiny", prompt="Hello", max_tokens=max_tokens, temperature=0,
                                     stream=True, **options)


@pytest.fixture(scope="module")
def small(llama31_ckpts):
    """2 ranks, 2 slots, room for 1 more request in the queue."""
    srv = Server(llama31_ckpts[2], 2, "--max_batch_size", "2", "--max_queue", "1", "--max_seq_len", "2048",
                 "--model_name", "tiny")
    yield srv
    srv.kill()


def test_beyond_the_queue_429_and_a_client_that_leaves_frees_its_slot(small):
    client = small.client()
    running = [stream(client) for _ in range(2)]
    for s in running:  # the first chunk: both are decoding, the batch is full
        next(iter(s))
    # A streamed answer starts (its headers come) once the request is queued.
    queued = stream(client, max_tokens=3)
    with pytest.raises(openai.RateLimitError) as caught:
        client.completions.create(model="tiny", prompt="Hi", max_tokens=1)
    assert caught.value.status_code == 429 and caught.value.body["code"] == "queue_full"
    for s in running:  # their clients go away: the slots free at once, and the queued request runs
        s.close()
    chunks = list(queued)
    assert chunks[-1].choices[0].finish_reason == "length"
    assert client.completions.create(model="tiny", prompt="Hi", max_tokens=2).choices[0].finish_reason


def test_sigterm_ends_every_rank(small):
    client = small.client()
    in_flight = stream(client)
    next(iter(in_flight))
    code = small.stop()
    assert code is not None, small.output[-3000:]  # torchrun itself exits with 1 after a SIGTERM
    assert "SIGTERM: stopping the server" in small.output
    assert "Server stopped: every rank has left its loop" in small.output, small.output[-3000:]
    # the request in flight finished within the grace, or ended with an error; it did not hang
    try:
        last = list(in_flight)[-1]
        assert last.choices[0].finish_reason == "length"
    except openai.APIError as e:
        assert "shutting down" in e.message
    small.assert_nothing_left()
    assert_port_closed(small.url)


def assert_port_closed(url):
    address = urlparse(url)
    with socket.socket() as s:
        assert s.connect_ex((address.hostname, address.port)) != 0


def test_killed_rank_ends_the_server(llama31_ckpts):
    srv = Server(llama31_ckpts[2], 2, "--max_batch_size", "2", "--max_seq_len", "2048", "--model_name", "tiny",
                 "--timeout", "5", LLAMA_TEST_FAULT="rank=1,at=step:30,do=kill")
    try:
        client = srv.client()
        with pytest.raises((openai.APIError, openai.APIConnectionError)) as caught:
            client.completions.create(model="tiny", prompt="Hello", max_tokens=LONG, temperature=0)
        code = srv.wait(120)  # catches a hang: --timeout 5 and the launcher's teardown take seconds
        assert code not in (None, 0), srv.output[-3000:]
        srv.assert_nothing_left()
        assert_port_closed(srv.url)
        # the request got an answer with an error, not a dropped connection
        assert isinstance(caught.value, openai.APIStatusError), repr(caught.value)
        assert caught.value.status_code == 503 and "failed" in caught.value.message
    finally:
        srv.kill()
