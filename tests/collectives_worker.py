"""Run by tests/test_collectives.py under torchrun on CPU ranks: every rank runs llama/layers.py's
collectives on its own inputs three ways (the in-place eager call, the functional eager call that
accelerators take, and the functional call torch.compile traces) and saves what it got, with the
sum and the concatenation computed by hand from every rank's inputs, to OUT.rankN.pt; and the
tokens it drew after distributed.broadcast_tokens (what GPU ranks do with their draws)."""

import sys

import torch
import torch.distributed as dist

from llama import layers
from llama.distributed import broadcast_tokens, init_model_parallel, rank_zero_draws

SHAPES = [(1, 1, 5), (3, 2, 4)]  # a decode step's (batch 1, one position) and a prefill's
# Dynamo's trace and AOTAutograd's functional graph, which decide how a collective is captured;
# inductor's code for them runs in the model's compiled decode at 2 ranks (tests/test_levers.py),
# and would cost this test a minute of compiling.
BACKEND = "aot_eager"


def inputs(rank: int, shape) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(100 * rank + shape[0]))


def main(out: str) -> None:
    init_model_parallel(torch.device("cpu"), None)
    rank, world = dist.get_rank(), dist.get_world_size()
    # fullgraph: the collectives must trace without a graph break.
    compiled = {f: torch.compile(f, fullgraph=True, backend=BACKEND)
                for f in (layers.all_reduce, layers.all_gather_last_dim)}
    results = {}
    with torch.inference_mode():
        for shape in SHAPES:
            everyone = [inputs(r, shape) for r in range(world)]
            results[shape] = {"sum": sum(everyone), "cat": torch.cat(everyone, dim=-1)}
            for name, f in (("sum", layers.all_reduce), ("cat", layers.all_gather_last_dim)):
                assert not layers._functional(everyone[rank])
                results[shape][f"{name} in-place"] = f(everyone[rank].clone())
                layers._functional, kept = (lambda x: True), layers._functional
                try:
                    results[shape][f"{name} functional"] = f(everyone[rank].clone()) + 0  # + 0: waits for it
                finally:
                    layers._functional = kept
                results[shape][f"{name} compiled"] = compiled[f](everyone[rank].clone())
        drawn = torch.tensor([rank, 7, 100 + rank])
        assert rank_zero_draws(drawn) is drawn  # CPU ranks send nothing
        results["tokens"] = broadcast_tokens(drawn)
    torch.save(results, f"{out}.rank{rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1])
