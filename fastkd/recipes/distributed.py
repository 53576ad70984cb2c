"""Process-group setup for `torchrun` and the few collectives the recipes need."""
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


def init(device: str = "auto") -> Context:
    """One process, or the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK): NCCL on GPUs,
    gloo on CPUs. device: "auto" (CUDA if available), "cpu" or "cuda"."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    target = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(target)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
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
