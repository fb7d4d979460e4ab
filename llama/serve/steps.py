"""The server's iterations, run by every rank in lockstep.

Before each iteration rank 0 decides a Plan (which requests join, which leave) and shares it;
then every rank makes the same engine calls in the same order, so the model's collectives meet.
Only rank 0 looks at the resulting tokens (scheduler.py)."""

from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch.distributed as dist

from ..distributed import control_group
from ..engine import Engine
from ..requests import Request, TokenEvent
from ..lockstep import share_from_rank0


@dataclass
class Plan:
    admit: List[Request] = field(default_factory=list)  # prefilled together into free slots
    release: List[int] = field(default_factory=list)  # request ids whose slots are freed first
    stop: bool = False  # the server is stopping: every rank leaves its loop


def share_plan(engine: Engine, decide: Optional[Callable[[bool], Plan]]) -> Plan:
    """Rank 0's plan, on every rank. decide(block) runs on rank 0 only.

    An idle engine waits for the next request as long as it takes, so the other ranks wait on a
    store key that only the watchdog ends (share_from_rank0). A busy one already knows its plan:
    a plain broadcast, under the collective timeout, costs less."""
    if engine.active == 0:
        return share_from_rank0(lambda: decide(True))
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return decide(False)
    box = [decide(False) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0, group=control_group())
    return box[0]


def carry_out(engine: Engine, plan: Plan) -> List[TokenEvent]:
    """One iteration: free the released slots, prefill the admitted requests, then one decode step
    for every request in the batch. Returns the tokens chosen, in that order."""
    for request_id in plan.release:
        engine.release(request_id)
    events = engine.admit(plan.admit) if plan.admit else []
    if engine.active:
        events += engine.step()
    return events


def lead(engine: Engine, decide: Callable[[bool], Plan], deliver: Callable[[List[TokenEvent]], None]) -> None:
    """Rank 0: decide, share, carry out, hand the tokens on; until a plan says stop."""
    while not (plan := share_plan(engine, decide)).stop:
        deliver(carry_out(engine, plan))


def follow(engine: Engine) -> None:
    """Every other rank: carry out rank 0's plans until one says stop."""
    while not (plan := share_plan(engine, None)).stop:
        carry_out(engine, plan)
