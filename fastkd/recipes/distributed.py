"""Process-group setup for `torchrun` and the few collectives the recipes need."""
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Context:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init(device: str = "auto", timeout_s: float = 600.0) -> Context:
    """One process, or the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK): NCCL on GPUs,
    gloo on CPUs. device: "auto" (CUDA if available), "cpu" or "cuda". timeout_s: how long a collective waits
    for a rank that stopped before the run fails (torch's default is 30 minutes)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    target = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(target)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
    return Context(rank, world_size, target)


def finish() -> bool:
    """Leave the process group, if any; True on the process that reports (rank 0, or the only one)."""
    if not dist.is_initialized():
        return True
    is_main = dist.get_rank() == 0
    dist.destroy_process_group()
    return is_main


def group(ctx: Context):
    """The process group spanning every rank, or None in a single process."""
    return dist.group.WORLD if ctx.distributed else None


def gather_rows(tensor: torch.Tensor, ctx: Context) -> torch.Tensor:
    """Concatenate every rank's (n_r, ...) rows (n_r may differ) in rank order; no rows duplicated."""
    if not ctx.distributed:
        return tensor
    sizes = [torch.zeros((), dtype=torch.long, device=tensor.device) for _ in range(ctx.world_size)]
    dist.all_gather(sizes, torch.tensor(len(tensor), device=tensor.device))
    longest = int(max(sizes))
    padded = torch.zeros((longest, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    padded[:len(tensor)] = tensor
    parts = [torch.empty_like(padded) for _ in range(ctx.world_size)]
    dist.all_gather(parts, padded)
    return torch.cat([part[:int(size)] for part, size in zip(parts, sizes)])


def sync_buffers(model: torch.nn.Module, ctx: Context) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics drift apart, each rank normalising its own
    batches), so that evaluation on any rank and the checkpoint describe one model."""
    if ctx.distributed:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def gather_objects(obj, ctx: Context) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank (picklable objects, e.g. random states)."""
    if not ctx.distributed:
        return [obj]
    out = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def to_device(batch, device: torch.device):
    """A batch of any nesting of tensors, lists, tuples and dicts, with every tensor moved to `device`."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        moved = [to_device(v, device) for v in batch]
        return type(batch)(*moved) if hasattr(batch, "_fields") else type(batch)(moved)
    return batch


def broadcast_object(obj, ctx: Context):
    """Rank 0's `obj` on every rank (e.g. an error raised on rank 0 only, so that every rank stops)."""
    if not ctx.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
