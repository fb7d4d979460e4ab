"""Whether two runs of the same checkpoint agree: greedy tokens exactly (fp32 on two devices, or
compiled against eager), and logits within a tolerance (bf16 against fp32, teacher-forced: both
read the same token sequence, so one early difference cannot spread). The comparisons take any
two Llamas or models, so they run CPU against CPU in the tests too."""

import traceback
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from llama import Llama
from llama.model import Transformer

from .checks import Context
from .models import prompts
from .report import Row

NEAR_TIE = 1e-3  # a top-2 logit margin below this may flip on last-bit differences: a WARN, not a FAIL
# bf16 against fp32 on the small sharp checkpoint (relative L2 error of each position's logits,
# and how often the top token agrees). bf16 keeps 8 bits of mantissa (0.4% a rounding); the CPU's
# bf16 path gives about 1% at worst here (tests/test_gpu_check.py), so 5% leaves room for a GPU's
# other summation orders while still failing wrong weights or a broken kernel (~100%).
BF16_REL_TOL = 0.05
BF16_TOP1_MIN = 0.9
PROMPT_LENGTHS = [5, 17, 40]
NEW_TOKENS = 48


def guarded(name: str, check: Callable[[], Row]) -> Row:
    """check()'s row, or a FAIL row carrying the exception that stopped it."""
    try:
        return check()
    except Exception as e:  # noqa: BLE001  one failing step must not hide the others
        traceback.print_exc()  # into the check's log
        return Row(name, "FAIL", detail=f"{type(e).__name__}: {e}")


def greedy(llama: Llama, prompt_tokens: List[List[int]], new_tokens: int) -> List[List[int]]:
    """Greedy continuations of exactly new_tokens each (stop tokens ignored)."""
    llama.tokenizer.stop_tokens = []
    tokens, _ = llama.generate(prompt_tokens, max_gen_len=new_tokens, temperature=0)
    return tokens


def first_mismatch(reference: Sequence[Sequence[int]], candidate: Sequence[Sequence[int]]) -> Optional[Tuple[int, int]]:
    """(row, position) of the earliest differing token over all rows (a missing token counts as a
    difference), or None when they are equal."""
    found = None
    for row, (want, got) in enumerate(zip(reference, candidate)):
        position = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), None)
        if position is None and len(want) != len(got):
            position = min(len(want), len(got))
        if position is not None and (found is None or position < found[1]):
            found = (row, position)
    if found is None and len(reference) != len(candidate):
        found = (min(len(reference), len(candidate)), 0)
    return found


def top2_margin(model: Transformer, sequence: List[int]) -> float:
    """The gap between the two highest logits after `sequence` (teacher-forced)."""
    device = model.norm.weight.device
    logits = model(torch.tensor([sequence], device=device), 0)[0, -1].float()
    top = torch.topk(logits, 2).values
    return float(top[0] - top[1])


def greedy_parity(name: str, reference: Llama, candidate: Llama, prompt_tokens: List[List[int]],
                  new_tokens: int, threshold: str = "all tokens equal") -> Row:
    """PASS when the candidate's greedy tokens equal the reference's; at the first difference, a
    near tie in the reference's logits (top-2 margin below NEAR_TIE) is a WARN, anything else FAIL."""
    want = greedy(reference, prompt_tokens, new_tokens)
    got = greedy(candidate, prompt_tokens, new_tokens)
    total = sum(len(w) for w in want)
    mismatch = first_mismatch(want, got)
    if mismatch is None:
        return Row(name, "PASS", {"tokens": total, "equal": total}, threshold,
                   f"{len(prompt_tokens)} prompts x {new_tokens} greedy tokens")
    row, position = mismatch
    margin = top2_margin(reference.model, prompt_tokens[row] + want[row][:position])
    equal = sum(next((i for i, (a, b) in enumerate(zip(w, g)) if a != b), min(len(w), len(g)))
                for w, g in zip(want, got))
    detail = (f"prompt {row} differs from new token {position} on ({want[row][position:position + 3]} against "
              f"{got[row][position:position + 3]}); the reference's top-2 margin there is {margin:.3g}")
    status = "WARN" if margin < NEAR_TIE else "FAIL"
    return Row(name, status, {"tokens": total, "equal": equal, "margin": margin}, threshold,
               detail + (" (a near tie)" if status == "WARN" else ""))


def teacher_forced_logits(model: Transformer, sequences: List[List[int]]) -> torch.Tensor:
    """Every position's float logits (positions, vocab) on the CPU, one sequence at a time."""
    device = model.norm.weight.device
    return torch.cat([model(torch.tensor([s], device=device), 0)[0].float().cpu() for s in sequences])


def logit_agreement(reference: torch.Tensor, candidate: torch.Tensor) -> Dict[str, float]:
    """reference, candidate: (positions, vocab). Relative L2 error of each position's logits
    (max and mean), the largest absolute difference, and how often the top tokens agree."""
    error = (candidate - reference).norm(dim=-1) / reference.norm(dim=-1)
    return {"rel_err_max": float(error.max()), "rel_err_mean": float(error.mean()),
            "abs_err_max": float((candidate - reference).abs().max()),
            "top1_agree": float((candidate.argmax(-1) == reference.argmax(-1)).float().mean())}


def logits_within(name: str, reference: Transformer, candidate: Transformer, sequences: List[List[int]],
                  rel_tol: float = BF16_REL_TOL, top1_min: float = BF16_TOP1_MIN) -> Row:
    stats = logit_agreement(teacher_forced_logits(reference, sequences), teacher_forced_logits(candidate, sequences))
    ok = stats["rel_err_max"] <= rel_tol and stats["top1_agree"] >= top1_min
    return Row(name, "PASS" if ok else "FAIL", stats, f"rel_err_max <= {rel_tol:g}, top1_agree >= {top1_min:g}",
               f"{sum(map(len, sequences))} positions teacher-forced, {candidate.norm.weight.dtype} against "
               f"{reference.norm.weight.dtype}")


def run(ctx: Context) -> Iterator[Row]:
    ckpt = ctx.tiny_checkpoint(1)

    def build(device: str, dtype: str) -> Llama:
        return Llama.build(str(ckpt), str(ckpt / "tokenizer.model"), max_seq_len=128, max_batch_size=4,
                           device=device, dtype=dtype)

    cuda32, cpu32 = build("cuda", "fp32"), build("cpu", "fp32")
    prompt_tokens = prompts(PROMPT_LENGTHS)
    name = "fp32 greedy, CUDA = CPU"
    yield guarded(name, lambda: greedy_parity(name, cpu32, cuda32, prompt_tokens, NEW_TOKENS))
    sequences = [p + t for p, t in zip(prompt_tokens, greedy(cuda32, prompt_tokens, NEW_TOKENS))]
    name = "bf16 logits vs fp32"
    yield guarded(name, lambda: logits_within(name, cuda32.model, build("cuda", "bf16").model, sequences))
