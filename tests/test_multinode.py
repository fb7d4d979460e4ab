"""A multi-node launch, checked on one machine: two torchrun launches (--nnodes 2, one process
each, meeting at 127.0.0.1) give the same tokens as one node with two processes."""

import json
import subprocess

import pytest

from .launch import REPO, assert_nothing_left, example_args, free_port, tagged_env, torchrun, torchrun_node


def test_two_nodes_give_the_same_tokens_as_one_node(llama31_ckpts, tmp_path):
    # Sampled (the examples' default temperature), so the seeded sampling must agree too.
    args = example_args(llama31_ckpts[2], "--logprobs", "True", "--max_gen_len", "12", "--timeout", "30")
    env = tagged_env()
    one_node = tmp_path / "one_node.json"
    proc = subprocess.run(torchrun("example_text_completion.py", *args, "--output_json", str(one_node)),
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    two_nodes = tmp_path / "two_nodes.json"
    port = free_port()
    nodes = [subprocess.Popen(torchrun_node(n, port, "example_text_completion.py", *args,
                                            "--output_json", str(two_nodes)),
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for n in (0, 1)]
    outputs = [node.communicate(timeout=180)[0] for node in nodes]
    for node, output in zip(nodes, outputs):
        assert node.returncode == 0, output[-3000:]
    assert outputs[0].count("Loaded in") == 1 and "Loaded in" not in outputs[1]  # only global rank 0 prints

    expected, actual = json.loads(one_node.read_text()), json.loads(two_nodes.read_text())
    assert [r["tokens"] for r in actual] == [r["tokens"] for r in expected]
    assert [r["generation"] for r in actual] == [r["generation"] for r in expected]
    for want, got in zip(expected, actual):
        assert got["logprobs"] == pytest.approx(want["logprobs"], abs=1e-5)
    assert_nothing_left(env)
