"""When one rank fails (raises, is killed, hangs) in build or generation, every other rank exits
within about --timeout seconds, saying which rank failed and why, and no process is left.

One node: torchrun itself stops the other ranks when one exits with an error. Two "nodes" (two
torchrun launches on this machine): the other node's rank learns of the failure through the
process group's store (an error report, or a heartbeat that stops). Faults come from a broken
checkpoint copy on one node, or from LLAMA_TEST_FAULT (tests/fault_injection.py, which runs the
example script with the fault put in)."""

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from .launch import FAULTY, REPO, assert_nothing_left, example_args, free_port, tagged_env, torchrun, torchrun_node

TIMEOUT = 5  # --timeout for these runs, seconds
# A run that never ends is caught by the subprocess time limit. Wall-clock bounds are kept loose, as
# a busy 2-core machine can take a minute to start torchrun and two ranks; the failure-detection
# path taken is shown by our own messages instead.
RUN_LIMIT = 300
# How much later than the failed node the other node may exit: normally about TIMEOUT. Well under
# the default --timeout (120 s), so a rank that fell back on it, or on torch's 10-minute collective
# timeout, fails this.
NODE_SKEW_LIMIT = 60


def run_one_node(ckpt, fault: str):
    env = tagged_env(LLAMA_TEST_FAULT=fault)
    command = torchrun(FAULTY, "example_text_completion.py", *example_args(ckpt, "--timeout", str(TIMEOUT)))
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=RUN_LIMIT)
    return proc, env


def test_rank_that_raises_while_loading_stops_the_others(llama31_ckpts):
    proc, env = run_one_node(llama31_ckpts[2], "rank=1,at=build,do=raise")
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    assert "failure injected by LLAMA_TEST_FAULT" in output
    assert "Loaded in" not in output  # rank 0 never went on without rank 1
    assert_nothing_left(env)


def test_rank_killed_while_generating_stops_the_others(llama31_ckpts):
    proc, env = run_one_node(llama31_ckpts[2], "rank=1,at=step:3,do=kill")
    assert proc.returncode != 0
    assert "Loaded in" in proc.stdout
    assert "rank 1: killed by LLAMA_TEST_FAULT" in proc.stderr
    assert "==================================" not in proc.stdout  # rank 0 printed no completion
    assert_nothing_left(env)


def test_hung_rank_ends_the_run_after_the_collective_timeout(llama31_ckpts):
    """A rank that is alive (heartbeat going) but stuck: the others' collective times out."""
    proc, env = run_one_node(llama31_ckpts[2], "rank=1,at=step:3,do=hang")
    assert proc.returncode != 0
    assert "a collective step timed out after 5 s, yet every rank kept its heartbeat" in proc.stdout + proc.stderr
    assert_nothing_left(env)


def run_two_nodes(ckpt0: Path, ckpt1: Path, fault: str = ""):
    """Launches node 0 and node 1 together; returns each node's (process, exit time)."""
    port = free_port()
    env = tagged_env(LLAMA_TEST_FAULT=fault)
    procs = [subprocess.Popen(torchrun_node(n, port, FAULTY, "example_text_completion.py",
                                            *example_args(ckpt, "--timeout", str(TIMEOUT))),
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for n, ckpt in enumerate((ckpt0, ckpt1))]
    ended = [None, None]
    outputs = ["", ""]
    deadline = time.monotonic() + RUN_LIMIT
    try:
        while None in ended and time.monotonic() < deadline:
            for n, proc in enumerate(procs):
                if ended[n] is None and proc.poll() is not None:
                    ended[n] = time.monotonic()
            time.sleep(0.1)
    finally:
        for n, proc in enumerate(procs):
            if proc.poll() is None:
                proc.kill()
            outputs[n] = proc.communicate()[0]
    assert None not in ended, f"a node did not exit:\n{outputs}"
    return procs, ended, outputs, env


def test_other_node_stops_when_a_rank_cannot_read_its_checkpoint(llama31_ckpts, tmp_path):
    """Node 1's copy of the checkpoint is truncated (a broken download); node 0's is fine."""
    broken = shutil.copytree(llama31_ckpts[2], tmp_path / "broken")
    shard = broken / "consolidated.01.pth"
    shard.write_bytes(shard.read_bytes()[:1000])
    procs, ended, outputs, env = run_two_nodes(llama31_ckpts[2], broken)
    assert procs[0].returncode != 0 and procs[1].returncode != 0
    assert f"cannot read {shard}: the file is truncated or corrupt" in outputs[1]
    assert f"rank 0: stopping: rank 1 failed: ValueError: cannot read {shard}" in outputs[0]
    assert ended[0] - ended[1] < NODE_SKEW_LIMIT
    assert_nothing_left(env)


def test_other_node_stops_when_a_rank_is_killed_while_generating(llama31_ckpts):
    procs, ended, outputs, env = run_two_nodes(llama31_ckpts[2], llama31_ckpts[2], "rank=1,at=step:3,do=kill")
    assert procs[0].returncode != 0 and procs[1].returncode != 0
    assert "Loaded in" in outputs[0]
    assert "rank 0: stopping: rank 1 stopped responding: no heartbeat for 5 s" in outputs[0]
    assert ended[0] - ended[1] < NODE_SKEW_LIMIT
    assert_nothing_left(env)


def test_bad_input_raises_the_same_error_on_every_rank(llama31_ckpts, tmp_path):
    """Each bad call raises the same ValueError on both ranks (inputs that differ between ranks
    included), and the ranks stay in step afterwards."""
    env = tagged_env()
    out = tmp_path / "bad"
    proc = subprocess.run(torchrun("tests/lockstep_driver.py", str(llama31_ckpts[2]), str(out), "bad_inputs"),
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=RUN_LIMIT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rank0, rank1 = (json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in (0, 1))
    assert rank0 == rank1
    errors = rank0["errors"]
    assert all(errors.values()), errors
    for case in ("different prompts per rank", "too long on one rank only", "different max_gen_len per rank"):
        assert "the ranks were given different" in errors[case]
    assert "temperature" in errors["negative temperature"]
    assert "max_seq_len" in errors["prompt longer than max_seq_len"]
    assert_nothing_left(env)


@pytest.mark.parametrize("timeout", [0, -1, "soon"])
def test_bad_timeout(llama2_ckpts, timeout):
    from llama import Llama

    ckpt = llama2_ckpts[1]
    with pytest.raises(ValueError, match="timeout must be a number of seconds > 0"):
        Llama.build(str(ckpt), str(ckpt / "tokenizer.model"), max_seq_len=32, max_batch_size=1, timeout=timeout)
