"""benchmarks/gpu_check (scripts/gpu_check.sh), checked without a GPU: the dry run the script
falls back to, the runner that keeps a failing or hanging check from stopping the others, and
the checks' own judgement (greedy and logit comparisons, kernel names, bandwidth arithmetic)
run CPU against CPU, where a wrong model must FAIL."""

import copy
import json
import os
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

from llama import Llama

from .conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))  # gpu_check lives there (fairscale owns the name `benchmarks`)

from gpu_check import __main__ as gpu_check_main  # noqa: E402
from gpu_check import compiled, models, numerics, ranks, runner, sdpa, speed  # noqa: E402
from gpu_check.checks import CHECKS, Check, Context  # noqa: E402
from gpu_check.report import Row, format_value, status_at_least, table, write_json  # noqa: E402

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="these check the CPU-only behaviour")
ALL_ROWS = [name for check in CHECKS for name in check.rows]


def test_the_script_without_a_gpu_lists_the_checks_and_exits_0(tmp_path):
    """The .sh path as far as the checker, installing nothing (--skip-setup, this Python)."""
    out = tmp_path / "sub" / "gpu_check.json"
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--skip-setup", "--out", str(out)],
                          env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "no CUDA GPU found" in proc.stdout and "dry run" in proc.stdout
    for check in CHECKS:
        assert f"  {check.name} (up to {check.budget} s" in proc.stdout
    for name in ALL_ROWS:
        assert f"    - {name}\n" in proc.stdout
    doc = json.loads(out.read_text())
    assert doc["dry_run"] is True and doc["gpu_found"] is False and doc["device"]["gpus"] == 0
    assert [r["name"] for r in doc["rows"]] == ALL_ROWS
    assert {r["status"] for r in doc["rows"]} == {"SKIP"} and doc["summary"]["SKIP"] == len(ALL_ROWS)
    assert doc["setup_seconds"] is not None and 0 < doc["budget_seconds"] <= 480


def test_dry_run_of_some_checks_and_unknown_names(tmp_path, capsys):
    out = tmp_path / "x.json"
    assert gpu_check_main.main(["--dry-run", "--only", "speed,device", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["check"] for r in rows] == ["device"] * 4 + ["speed"] * 4
    with pytest.raises(SystemExit):
        gpu_check_main.main(["--only", "sped", "--out", str(out)])
    assert "unknown check(s) ['sped']" in capsys.readouterr().err


def test_a_gpu_that_torch_cannot_see_is_a_failure_not_a_dry_run(tmp_path, monkeypatch):
    """nvidia-smi lists a GPU but torch sees none (a CPU wheel, a driver too old): exit code 1."""
    monkeypatch.setattr(gpu_check_main, "nvidia_smi_gpus", lambda: 1)
    out = tmp_path / "x.json"
    assert gpu_check_main.main(["--out", str(out)]) == 1
    (row,) = json.loads(out.read_text())["rows"]
    assert row["status"] == "FAIL" and "nvidia-smi lists 1 GPU(s) but torch sees none" in row["detail"]


def fake_check(function: str, rows=("first", "second", "third")) -> Check:
    return Check("fake", f"tests.gpu_check_fakes:{function}", tuple(rows), budget=60, about="")


def run_fake(tmp_path, function: str, timeout: float = 60):
    ctx = Context(tmp_path, tmp_path / "logs", timeout, REPO)
    start = time.monotonic()
    rows, info = runner.run_check(fake_check(function), ctx)
    return rows, info, time.monotonic() - start


def test_a_hanging_check_is_killed_at_its_limit_and_keeps_what_it_reported(tmp_path):
    rows, _, seconds = run_fake(tmp_path, "hang", timeout=3)
    assert [(r.name, r.status) for r in rows] == [("first", "PASS"), ("second", "FAIL"), ("third", "SKIP")]
    assert "timed out: still running at its limit of 3 s" in rows[1].detail and seconds < 3 + runner.KILL_GRACE + 5


@pytest.mark.parametrize("function,reason", [("boom", "RuntimeError: boom"), ("crash", "exited with code 3")])
def test_an_error_or_a_crash_fails_the_row_it_reached(tmp_path, function, reason):
    rows, _, _ = run_fake(tmp_path, function)
    assert [(r.name, r.status) for r in rows] == [("first", "PASS"), ("second", "FAIL"), ("third", "SKIP")]
    assert reason in rows[1].detail and all(r.check == "fake" for r in rows)


def test_a_process_that_does_not_exit_is_killed_soon_after_its_last_row(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "EXIT_GRACE", 1.0)
    rows, _, seconds = run_fake(tmp_path, "exit_hangs")
    assert [r.status for r in rows] == ["PASS", "PASS", "PASS", "FAIL"]
    assert rows[3].name == "fake: process" and "exit hung" in rows[3].detail and seconds < 20


def test_a_run_goes_on_past_a_failing_check_skips_what_it_cannot_and_writes_everything(tmp_path, capsys):
    checks = [fake_check("boom"), Check("two", "tests.gpu_check_fakes:facts", ("first",), 60, "", gpus=2),
              fake_check("facts")]
    out = tmp_path / "run.json"
    facts = {"gpus": 1}
    assert gpu_check_main.run_all(checks, out, facts, budget=100, prepare_workdir=lambda path, gpus: None) == 1
    doc = json.loads(out.read_text())
    assert [(r["check"], r["status"]) for r in doc["rows"]] == [("fake", "PASS"), ("fake", "FAIL"), ("fake", "SKIP"),
                                                                ("two", "SKIP"), ("fake", "WARN"), ("fake", "WARN"),
                                                                ("fake", "WARN")]
    assert "needs 2 GPUs; this machine shows 1" in doc["rows"][3]["detail"] and doc["device"]["name"] == "fake GPU"
    assert (tmp_path / "run_logs" / "fake.log").is_file() and "PASS 1, FAIL 1, WARN 3, SKIP 2" in capsys.readouterr().out
    assert gpu_check_main.run_all(checks[2:], out, facts, budget=5, prepare_workdir=lambda path, gpus: None) == 0
    assert "out of time" in json.loads(out.read_text())["rows"][0]["detail"]
    hang = [fake_check("hang")]  # --per-check shortens every check's own limit
    assert gpu_check_main.run_all(hang, out, facts, budget=100, prepare_workdir=lambda path, gpus: None,
                                  per_check=2) == 1
    assert "timed out: still running at its limit of 2 s" in json.loads(out.read_text())["rows"][1]["detail"]


def test_rows_and_facts_come_back_and_the_table_and_json_hold_them(tmp_path):
    rows, info, _ = run_fake(tmp_path, "facts")
    assert info == {"name": "fake GPU"} and [r.value for r in rows] == [{"x": 0.5}] * 3
    rows.append(Row("a float", "PASS", 1234.5678, ">= 1", "one\nline"))
    text = table(rows)
    assert "a float | PASS   | 1235  | >= 1" in text and "one line" in text and text.count("WARN") == 3
    write_json(tmp_path / "out.json", rows, info, dry_run=False)
    doc = json.loads((tmp_path / "out.json").read_text())
    assert doc["summary"] == {"PASS": 1, "FAIL": 0, "WARN": 3, "SKIP": 0} and doc["device"] == info
    assert format_value({"a": 0.123456, "b": None, "c": [1, 2.0]}) == "a=0.1235, b=-, c=[1, 2]"
    with pytest.raises(ValueError, match="status 'OK' is not one of"):
        Row("x", "OK")


def test_thresholds_and_the_bandwidth_arithmetic():
    assert [status_at_least(v, 0.8, 0.5) for v in (0.8, 0.79, 0.5, 0.49)] == ["PASS", "WARN", "WARN", "FAIL"]
    assert status_at_least(0.1, 0.5) == "FAIL"
    args = models.ModelArgs.from_dict({**models.LLAMA31_8B, "vocab_size": models.VOCAB})
    # 32 layers x (K and V) x 8 heads x 128 x 2 bytes = 128 KiB a position
    assert speed.kv_bytes(args, [100, 50], 2) == 150 * 128 * 1024
    assert speed.bandwidth_fraction(15e9, 0.005, 3.75e12) == pytest.approx(0.8)


def test_decode_rows_count_every_weight_read_and_the_live_cache():
    model = models.random_model(models.TINY, torch.device("cpu"), torch.float32, max_batch_size=2, max_seq_len=64,
                                vocab_size=512)
    weights = sum(p.numel() * 4 for n, p in model.named_parameters() if n != "tok_embeddings.weight")
    kv = speed.kv_bytes(model.params, [20, 20], 4)
    read = 1e9
    for fraction, status in ((0.9, "PASS"), (0.6, "WARN"), (0.3, "FAIL")):
        step = (weights + kv) / read / fraction
        row = speed.decode_row("d", model, {"step_s": step, "graph_step_s": step / 2, "first_step_s": 1.0,
                                            "mean_kv_len": 20}, 2, read)
        assert row.status == status and row.value["of_hbm"] == pytest.approx(fraction)
        assert row.value["graph_of_hbm"] == pytest.approx(2 * fraction) and row.value["tok_s"] == pytest.approx(2 / step)


@pytest.mark.parametrize("name,backend", [
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4>>", "flash"),
    ("fmha_cutlassF_bf16_aligned_64x128_rf_sm80(PyTorchMemEffAttention::AttentionKernel<...>)", "efficient"),
    ("aten::_efficient_attention_forward", "efficient"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x128", "cudnn"),
    ("aten::_scaled_dot_product_cudnn_attention", "cudnn"),
    ("aten::_scaled_dot_product_attention_math", "math"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu", ""),
    ("sm90_xmma_gemm_bf16bf16_bf16f32", ""), ("aten::scaled_dot_product_attention", ""),
])
def test_kernel_names_are_told_apart(name, backend):
    assert sdpa.backend_of(name) == backend


def test_the_profiler_sees_the_math_kernel_and_that_fails():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(1, 4, 8, 16)
    with sdpa_kernel(SDPBackend.MATH):
        math = sdpa.classify(sdpa.profiled_names(lambda: F.scaled_dot_product_attention(q, q, q, is_causal=True)))
    assert "math" in math and sdpa.kernel_row("k", math, "x").status == "FAIL"
    assert sdpa.kernel_row("k", {"efficient": ["fmha_cutlassF"]}, "x").status == "PASS"
    assert sdpa.kernel_row("k", {}, "x").status == "WARN"


@pytest.fixture(scope="module")
def sharp_llamas(llama31_sharp_ckpt):
    """The sharp checkpoint on CPU in fp32 twice (one model, two engines), and a copy of its model
    with every weight moved by noise of half its spread (what a wrong kernel might give)."""
    reference = Llama.build(str(llama31_sharp_ckpt), str(llama31_sharp_ckpt / "tokenizer.model"), max_seq_len=32,
                            max_batch_size=2, device="cpu", dtype="fp32")
    moved = copy.deepcopy(reference.model)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * p.std() * 0.5)
    return reference, Llama(reference.model, reference.tokenizer), Llama(moved, reference.tokenizer)


def test_greedy_parity_passes_the_same_weights_and_fails_others(sharp_llamas):
    reference, same, other = sharp_llamas
    prompt_tokens = models.prompts([3, 9])
    assert numerics.greedy_parity("g", reference, same, prompt_tokens, 8).status == "PASS"
    row = numerics.greedy_parity("g", reference, other, prompt_tokens, 8)
    assert row.status == "FAIL" and row.value["margin"] >= numerics.NEAR_TIE and "differs from new token" in row.detail
    assert numerics.first_mismatch([[1, 2, 3], [4, 5, 6]], [[1, 2, 3], [4, 9, 6]]) == (1, 1)
    assert numerics.first_mismatch([[1, 2], [4, 5]], [[1], [4, 5]]) == (0, 1)  # a missing token differs too
    assert numerics.first_mismatch([[1, 2]], [[1, 2]]) is None


def test_bf16_logits_pass_their_tolerance_and_other_weights_fail_it(sharp_llamas):
    reference, _, other = sharp_llamas
    sequences = models.prompts([8, 24], seed=3)
    in_bf16 = copy.deepcopy(reference.model).to(torch.bfloat16)  # CUDA's bf16: bf16 products, fp32 sums
    row = numerics.logits_within("l", reference.model, in_bf16, sequences)
    assert row.status == "PASS" and 0 < row.value["rel_err_max"] < numerics.BF16_REL_TOL, row
    assert numerics.logits_within("l", reference.model, other.model, sequences).status == "FAIL"


def test_graph_sync_and_rank_rows(tmp_path):
    assert compiled.replay_row("r", {"steps": 15, "replays": 15, "launches": 0, "skips": 0}).status == "PASS"
    assert compiled.replay_row("r", {"steps": 15, "replays": 0, "launches": 16, "skips": 0}).status == "PASS"
    assert compiled.replay_row("r", {"steps": 15, "replays": 15, "launches": 15, "skips": 1}).status == "WARN"
    assert compiled.replay_row("r", {"steps": 15, "replays": 3, "launches": 3, "skips": 0}).status == "WARN"
    assert compiled.replay_row("r", {"steps": 15, "replays": 0, "launches": 0, "skips": 0}).status == "FAIL"
    import collections
    assert compiled.syncs_row("s", 1.0, collections.Counter({"engine.py:301": 16})).status == "PASS"
    row = compiled.syncs_row("s", 3.0, collections.Counter({"engine.py:301": 32, "compiling.py:79": 16}))
    assert row.status == "WARN" and "engine.py:301 x32" in row.detail
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    one.write_text(json.dumps([{"input": "a", "generation": "x y"}, {"input": "b", "generation": "z"}]))
    two.write_text(json.dumps([{"input": "a", "generation": "x y"}, {"input": "b", "generation": "z"}]))
    assert ranks.equal_row("e", one, two).status == "PASS"
    two.write_text(json.dumps([{"input": "a", "generation": "x y"}, {"input": "b", "generation": "w"}]))
    assert ranks.equal_row("e", one, two).status == "FAIL"
    assert ranks.exit_row("x", {"rc": 0, "seconds": 9.0, "exit_lag_s": 2.0}, 100).status == "PASS"
    assert ranks.exit_row("x", {"rc": 0, "seconds": 99.0, "exit_lag_s": 80.0}, 100).status == "WARN"
    assert ranks.exit_row("x", {"rc": None, "seconds": 100.0, "exit_lag_s": None}, 100).status == "FAIL"
    assert ranks.exit_row("x", {"rc": 1, "seconds": 5.0, "exit_lag_s": 1.0}, 100).status == "FAIL"
