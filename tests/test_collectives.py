"""llama/layers.py's collectives on 2 gloo ranks: the in-place call (eager on CPU), the functional
one (eager on accelerators) and the functional one under torch.compile all give the sum, or the
concatenation in rank order, computed by hand from both ranks' inputs. And the broadcast that
makes rank 0's sampled tokens every GPU rank's (llama/distributed.py rank_zero_draws) hands both
ranks rank 0's."""

import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
WORKER = REPO / "tests" / "collectives_worker.py"


def test_collectives_agree_eager_and_compiled_with_a_sum_by_hand_and_rank_zero_draws_win(tmp_path):
    out = tmp_path / "results"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(WORKER), str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    for rank in (0, 1):
        results = torch.load(f"{out}.rank{rank}.pt", weights_only=True)
        assert results.pop("tokens").tolist() == [0, 7, 100]
        assert len(results) == 2
        for shape, got in results.items():
            for name in ("sum", "cat"):
                for way in ("in-place", "functional", "compiled"):
                    # Exact: a sum of two terms does not depend on their order; a gather only copies.
                    assert torch.equal(got[f"{name} {way}"], got[name]), (rank, shape, name, way)
            assert got["cat"].shape == (*shape[:-1], 2 * shape[-1])
