"""scripts/setup.sh picks PyTorch's CPU index first when the machine has no GPU, and the default
index (CUDA build) only when nvidia-smi finds one, the same torch version either way (the one the
suite runs on, unless TORCH_VERSION or its old name TORCH_CPU_VERSION says otherwise); checked
with its --dry-run listing."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CPU_INDEX = "--index-url https://download.pytorch.org/whl/cpu"


def dry_run(tmp_path: Path, nvidia_smi_exit: int = None, **env: str):
    """The torch installs setup.sh would try, on a PATH holding only `dirname` and, when
    nvidia_smi_exit is given, an nvidia-smi that exits with it (1: a driver without a GPU);
    env: more environment variables."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    os.symlink(shutil.which("dirname"), bin_dir / "dirname")
    if nvidia_smi_exit is not None:
        fake = bin_dir / "nvidia-smi"
        fake.write_text(f"#!{shutil.which('sh')}\nexit {nvidia_smi_exit}\n")
        fake.chmod(0o755)
    proc = subprocess.run([shutil.which("bash"), str(REPO / "scripts" / "setup.sh"), "--dry-run"],
                          env={"PATH": str(bin_dir), **env}, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


@pytest.mark.parametrize("nvidia_smi_exit", [None, 1], ids=["no nvidia-smi", "nvidia-smi without a GPU"])
def test_without_a_gpu_the_cpu_index_comes_first(tmp_path, nvidia_smi_exit):
    tries = dry_run(tmp_path, nvidia_smi_exit)
    assert tries[0] == f"pip install torch==2.13.0 {CPU_INDEX}"
    assert all("--index-url" not in t for t in tries[1:])  # the default index only as the fallback


def test_with_a_gpu_the_default_index_gives_the_cuda_build_of_the_same_version(tmp_path):
    assert dry_run(tmp_path, nvidia_smi_exit=0) == ["pip install torch==2.13.0"]


@pytest.mark.parametrize("variable", ["TORCH_VERSION", "TORCH_CPU_VERSION"])
@pytest.mark.parametrize("nvidia_smi_exit", [None, 0], ids=["without a GPU", "with a GPU"])
def test_the_torch_version_can_be_chosen(tmp_path, variable, nvidia_smi_exit):
    tries = dry_run(tmp_path, nvidia_smi_exit, **{variable: "2.9.1"})
    assert tries and all(t.startswith("pip install torch==2.9.1") for t in tries)


def test_the_new_name_wins_over_the_old_one(tmp_path):
    assert dry_run(tmp_path, 0, TORCH_VERSION="2.9.1", TORCH_CPU_VERSION="2.8.0") == ["pip install torch==2.9.1"]
