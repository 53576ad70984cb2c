"""The masked pairwise Huber loss over members spread across DDP ranks (LED-CD over the global batch).

Each rank gathers every rank's rows (no gradient), owns the ordered pairs whose first member is one of
its rows, and all-reduces the per-group partial sums between passes, so every pair is computed once and
the means and the loss are global. Symmetry gives each rank the full gradient of its own rows; it is
multiplied by the world size so that DDP's gradient averaging reproduces one process on the
concatenated batch. Runs eagerly (collectives), not inside torch.compile graphs.
"""
import torch
import torch.distributed as dist

from fastkd.ops.dispatch import backend_module
from fastkd.ops.pairwise_huber import group_losses, pack_groups, reduce_groups, student_grad


def _gather_members(x, group):
    """(G, N_local, ...) from every rank -> (G, N_local * world, ...), rank order."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=1)


class _DistributedPairwiseHuber(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, mask, delta, normalize, reduction, mean_floor, group):
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        sizes = torch.tensor([student.shape[1]], device=student.device)
        all_sizes = [torch.empty_like(sizes) for _ in range(world)]
        dist.all_gather(all_sizes, sizes, group=group)
        if any(int(s) != student.shape[1] for s in all_sizes):
            raise ValueError(f"every rank must hold the same number of samples, got {[int(s) for s in all_sizes]}")
        n_local = student.shape[1]
        s_all, t_all = _gather_members(student.detach(), group), _gather_members(teacher.detach(), group)
        mask_all = _gather_members(mask.to(torch.uint8), group).bool()
        local = torch.zeros_like(mask_all)
        local[:, rank * n_local:(rank + 1) * n_local] = True
        backend = backend_module("pairwise_huber", s_all)
        packed = pack_groups(mask_all, local)
        losses, stats = group_losses(backend, s_all, t_all, packed, delta, normalize, mean_floor,
                                     all_reduce=lambda t: dist.all_reduce(t, group=group))
        ctx.save_for_backward(s_all, t_all, mask_all, local, stats)
        ctx.delta, ctx.reduction, ctx.world, ctx.rank, ctx.n_local = delta, reduction, world, rank, n_local
        return reduce_groups(losses, packed[1], reduction, student.dtype)

    @staticmethod
    def backward(ctx, grad):
        s_all, t_all, mask_all, local, stats = ctx.saved_tensors
        backend = backend_module("pairwise_huber", s_all)
        grad_all = student_grad(backend, grad, s_all, t_all, pack_groups(mask_all, local), stats, ctx.delta,
                                ctx.reduction, grad_scale=ctx.world)
        start = ctx.rank * ctx.n_local
        return grad_all[:, start:start + ctx.n_local], None, None, None, None, None, None, None


def distributed_masked_pairwise_huber(student, teacher, mask, delta, normalize, reduction, mean_floor, group):
    """Like torch.ops.fastkd.masked_pairwise_huber(...)[0], with members (dim 1) split across `group`'s ranks."""
    return _DistributedPairwiseHuber.apply(student, teacher, mask, delta, normalize, reduction, mean_floor, group)
