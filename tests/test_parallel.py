"""Model parallel through the example scripts: 1 rank (plain python) against 2 ranks (torchrun),
for every combination of 1/2 shards on disk x 1/2 ranks, greedy, fp32."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def run_example(script: str, ckpt: Path, ranks: int, out: Path, *extra: str) -> subprocess.CompletedProcess:
    launcher = [sys.executable] if ranks == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)]
    cmd = launcher + [script, "--ckpt_dir", str(ckpt), "--tokenizer_path", str(ckpt / "tokenizer.model"),
                      "--device", "cpu", "--dtype", "fp32", "--temperature", "0", "--logprobs", "True",
                      "--max_gen_len", "12", "--output_json", str(out), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def runs(tmp_path_factory, llama2_ckpts, llama31_ckpts, llama32_ckpts):
    """Results of example_text_completion.py for each (model, shards on disk, ranks)."""
    root = tmp_path_factory.mktemp("runs")
    cache = {}

    def get(model: str, shards: int, ranks: int, script: str = "example_text_completion.py"):
        key = (model, shards, ranks, script)
        if key not in cache:
            ckpt = {"llama2": llama2_ckpts, "llama31": llama31_ckpts, "llama32": llama32_ckpts}[model][shards]
            out = root / f"{model}-{shards}-{ranks}-{script}.json"
            proc = run_example(script, ckpt, ranks, out)
            cache[key] = (json.loads(out.read_text()), proc.stdout)
        return cache[key]

    return get


def assert_same_results(expected, actual):
    assert len(expected) == len(actual)
    for want, got in zip(expected, actual):
        assert got["tokens"] == want["tokens"]
        assert got["generation"] == want["generation"]
        assert got["logprobs"] == pytest.approx(want["logprobs"], abs=1e-5)


@pytest.mark.parametrize("model", ["llama2", "llama31", "llama32"])
@pytest.mark.parametrize("shards,ranks", [(1, 2), (2, 1), (2, 2)])
def test_shards_and_ranks_give_identical_greedy_results(runs, model, shards, ranks):
    reference, _ = runs(model, 1, 1)
    assert any(len(r["tokens"]) == 12 for r in reference)  # some may stop early at a stop token
    results, _ = runs(model, shards, ranks)
    assert_same_results(reference, results)


def test_chat_example_matches_across_ranks(runs):
    reference, _ = runs("llama31", 1, 1, "example_chat_completion.py")
    results, _ = runs("llama31", 2, 2, "example_chat_completion.py")
    assert_same_results(reference, results)
    assert all(r["generation"]["role"] == "assistant" for r in results)


def test_only_rank_zero_prints_and_load_time_is_reported(runs):
    _, stdout = runs("llama2", 2, 2)
    assert stdout.count("I believe the meaning of life is") == 1
    assert stdout.count("Loaded in") == 1
