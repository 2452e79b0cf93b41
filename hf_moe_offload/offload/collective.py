"""What the processes of a distributed offload decide together: whether a step that every rank takes (opening the
store, reading a unit's share) failed on any of them, and (experts.py) whether a forward fetches routed experts.

A rank that raises before a collective the others wait in leaves them hanging until the backend's timeout (NCCL: ten
minutes by default). So every such step ends with `raise_together`: one small all-reduce, after which the failing
rank raises its own error and every other rank a `RuntimeError` naming it.
"""

from __future__ import annotations

import torch


def host_group(group):
    """A process group over the same ranks as `group` whose collectives take host tensors (gloo), for the small
    decisions made per fetch and per forward: with NCCL a flag on the device costs a host synchronisation each time
    (`.item()` waits for the GPU). A new group is made even when `group` is gloo already, so that the thread using it
    never interleaves with another thread's collectives on `group` (ranks could see them in different orders). Every
    rank calls this at the same point.
    """
    return torch.distributed.new_group(ranks=torch.distributed.get_process_group_ranks(group), backend="gloo")


def flag_device(group, device: torch.device) -> torch.device:
    """Where a flag tensor of `group`'s collectives lives: the execution device for NCCL, else the CPU."""
    backend = torch.distributed.get_backend(group)
    return device if backend == "nccl" else torch.device("cpu")


def raise_together(group, error: BaseException | None, device: torch.device, what: str) -> None:
    """Every rank of `group` learns whether `what` failed on any rank: the rank whose `error` it is raises it, the
    others raise a `RuntimeError` naming the (highest) failing rank. A no-op when every rank succeeded.

    Args:
        group: the process group (every rank calls this at the same point).
        error: this rank's exception, or None.
        device: the flag's device (`flag_device`).
        what: the step, for the message of the ranks that did not fail.
    """
    mine = group.rank() + 1 if error is not None else 0
    flag = torch.tensor([mine], dtype=torch.int64, device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=group)
    if error is not None:
        raise error
    failed = int(flag.item())
    if failed:
        raise RuntimeError(f"{what} failed on rank {failed - 1} (its own error says why); this rank stops too")


def release_host_groups(groups) -> None:
    """Destroy the `host_group`s in `groups` (a local operation); ones the whole package's teardown
    (`destroy_process_group()`) took with it already are skipped."""
    dist = torch.distributed
    for group in groups:
        if group is None or not dist.is_initialized():
            continue
        try:
            dist.destroy_process_group(group)
        except ValueError:  # "Invalid process group specified": destroyed with the default group
            pass
