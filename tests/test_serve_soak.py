"""A minute of mixed traffic on 2 CPU ranks (benchmarks/soak_serve.py, which runs for 10): streams,
whole answers, clients that leave mid-stream, bad requests, prompts near the context, JSON mode.
Every request ends complete or with its error, the slots are all free at the end, the memory does
not grow, and the server still answers and then stops cleanly."""

import sys

from .conftest import REPO
from .launch import processes_tagged
from .serving import Server

sys.path.insert(0, str(REPO / "benchmarks"))  # the soak lives there (fairscale owns the name `benchmarks`)

from soak_serve import KINDS, soak, summary  # noqa: E402


def test_a_minute_of_mixed_traffic_leaves_the_server_whole(llama31_ckpts):
    srv = Server(llama31_ckpts[2], 2, "--max_batch_size", "4", "--max_seq_len", "512", "--model_name", "tiny")
    try:
        report = soak(srv.url, lambda: [int(p.split(":", 1)[0]) for p in processes_tagged(srv.env)], seconds=60,
                      clients=4, seed=0, max_batch_size=4, max_seq_len=512, warmup=20)
        assert report["violations"] == [], summary(report)
        assert set(report["by_kind"]) == set(KINDS) and all(report["by_kind"].values()), summary(report)
        outcomes = report["by_outcome"]
        assert outcomes["complete"] and outcomes["refused"] and outcomes["disconnected"], summary(report)
        assert srv.stop() is not None, srv.output[-3000:]
        srv.assert_nothing_left()
    finally:
        srv.kill()
