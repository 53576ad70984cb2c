"""Triton kernels for the masked pairwise Huber loss (L2D's LED-CD / LED-ID) over variable-size groups.

Layout: x (G, N, D) read in place through its strides; per group g, `members[g, :counts[g]]` lists the
member positions n, the first `queries[g]` of them being the rows this process owns (all of them outside
DDP). Programs are (group, row tile i, column tile j) with tiles of BLOCK_N members; tiles past a group's
size exit at once, so the work is sum_g n_g^2 (Ds + Dt). Nothing of size n^2 or n*D leaves registers.

For each ordered pair (i query, j member, i != j), with D_ij = sqrt(max(|x_i|^2 + |x_j|^2 - 2 x_i.x_j,
1e-12)) (Gram term on tensor cores with tl.dot; tf32x3 for fp32 keeps fp32 accuracy), computed on rows
centred on the group's first member (translation-invariant, and free of the |x|^2 cancellation that
otherwise turns nearly coincident embeddings' distances into rounding noise):
  pass 1  (forward):  sum_ij Ds_ij, sum_ij Dt_ij                          -> normalising means m_s, m_t
  pass 2  (forward):  sum_ij h(u_ij), sum_ij h'(u_ij) Ds_ij,  u = Ds/m_s - Dt/m_t, h = Huber(delta)
  pass 3 (backward):  W_ij = w_g (h'(u_ij) - c_g) / (m_s Ds_ij)  (0 where the clamp is active),
                      grad_i = 2 (rowsum(W)_i x_i - (W X)_i)
c_g = sum h' Ds / sum Ds carries the gradient through the student's own mean; the factor 2 counts both
(i, j) and (j, i), which is what lets a DDP rank get its rows' full gradient from its own pairs only.
Per-group partial sums are written per program and summed in a fixed order (deterministic).
"""
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from fastkd.kernels.common import acc_dtype
from fastkd.kernels.triton_utils import autotune

BLOCK_N = 32  # members per tile; sizes the grid
BLOCK_D = 64  # channel chunk of the Gram products, fp16/bf16
BLOCK_D_FP32 = 32  # tf32x3 splits each fp32 operand in two: 64 spilled on sm_80 and sm_90 (benchmarks/aot.py)

# Warps: autotuned on a GPU, keyed by the embedding widths (fixed in a training run; group sizes, which change
# every batch, are not in the key). fp32 (tf32x3) only with 8 warps: 4 spill (AOT check).
_CONFIGS = [triton.Config({}, num_warps=4, num_stages=3), triton.Config({}, num_warps=8, num_stages=3)]


def _fitting(configs, args):
    return [c for c in configs if c.num_warps == 8] if args["PRECISION"] == "tf32x3" else configs


@triton.jit
def _centered_rows(base, stride_n, stride_d, rows, valid, ref_row, d, in_d):
    """Rows (R, BLOCK_D) minus the group's reference row, in the input dtype (exact for nearby values);
    invalid rows are zero. Distances and their gradients are translation-invariant, and centring removes
    the |x|^2 cancellation of the Gram form when a group's embeddings nearly coincide."""
    ref = tl.load(base + ref_row * stride_n + d * stride_d, mask=in_d, other=0.0)
    x = tl.load(base + rows[:, None] * stride_n + d[None, :] * stride_d, mask=valid[:, None] & in_d[None, :],
                other=0.0)
    return tl.where(valid[:, None] & in_d[None, :], x - ref[None, :], 0.0).to(x.dtype)


@triton.jit
def _distances(x_ptr, stride_g, stride_n, stride_d, g, ref_row, rows_i, valid_i, rows_j, valid_j, D,
               BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr):
    """(distance tile (BI, BJ) in ACC, mask of pairs whose squared distance hit the clamp)."""
    base = x_ptr + g.to(tl.int64) * stride_g
    gram = tl.zeros([rows_i.shape[0], rows_j.shape[0]], dtype=ACC)
    sq_i = tl.zeros([rows_i.shape[0]], dtype=ACC)
    sq_j = tl.zeros([rows_j.shape[0]], dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        in_d = d < D
        a = _centered_rows(base, stride_n, stride_d, rows_i, valid_i, ref_row, d, in_d)
        b = _centered_rows(base, stride_n, stride_d, rows_j, valid_j, ref_row, d, in_d)
        gram += tl.dot(a, tl.trans(b), input_precision=PRECISION, out_dtype=ACC)
        a_acc = a.to(ACC)
        b_acc = b.to(ACC)
        sq_i += tl.sum(a_acc * a_acc, axis=1)
        sq_j += tl.sum(b_acc * b_acc, axis=1)
    d2 = sq_i[:, None] + sq_j[None, :] - 2.0 * gram
    return tl.sqrt(tl.maximum(d2, 1e-12)), d2 < 1e-12


@triton.jit
def _tile(members_ptr, counts_ptr, queries_ptr, max_n, g, ti, tj, BLOCK_N: tl.constexpr):
    """Member positions and validity of row tile ti and column tile tj of group g, the pair mask, and the
    group's reference row for centring."""
    n = tl.load(counts_ptr + g)
    nq = tl.load(queries_ptr + g)
    i = ti * BLOCK_N + tl.arange(0, BLOCK_N)
    j = tj * BLOCK_N + tl.arange(0, BLOCK_N)
    valid_i = i < nq
    valid_j = j < n
    rows_i = tl.load(members_ptr + g.to(tl.int64) * max_n + i, mask=valid_i, other=0).to(tl.int64)
    rows_j = tl.load(members_ptr + g.to(tl.int64) * max_n + j, mask=valid_j, other=0).to(tl.int64)
    pairs = valid_i[:, None] & valid_j[None, :] & (i[:, None] != j[None, :])
    ref_row = tl.load(members_ptr + g.to(tl.int64) * max_n).to(tl.int64)  # the group's first member
    return rows_i, valid_i, rows_j, valid_j, pairs, ref_row


@triton.jit
def _huber_and_slope(u, delta):
    a = tl.abs(u)
    h = tl.where(a <= delta, 0.5 * u * u, delta * (a - 0.5 * delta))
    return h, tl.minimum(tl.maximum(u, -delta), delta)


@autotune(_CONFIGS, key=["Ds", "Dt"], prune=_fitting)
@triton.jit
def _pair_pass_kernel(s_ptr, ssg, ssn, ssd, t_ptr, tsg, tsn, tsd, members_ptr, counts_ptr, queries_ptr, means_ptr,
                      out_ptr, max_n, tiles, Ds, Dt, delta,
                      BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
                      LOSS: tl.constexpr):
    """One (group, row tile, column tile): writes [sum Ds, sum Dt] (pass 1) or, with LOSS, [sum h(u),
    sum h'(u) Ds] (pass 2) over the tile's ordered pairs."""
    g = tl.program_id(0)
    tile = tl.program_id(1)
    ti = tile // tiles
    tj = tile % tiles
    n = tl.load(counts_ptr + g)
    if (n >= 2) & (ti * BLOCK_N < tl.load(queries_ptr + g)) & (tj * BLOCK_N < n):
        rows_i, valid_i, rows_j, valid_j, pairs, ref = _tile(members_ptr, counts_ptr, queries_ptr, max_n, g, ti, tj,
                                                             BLOCK_N)
        d_s, _ = _distances(s_ptr, ssg, ssn, ssd, g, ref, rows_i, valid_i, rows_j, valid_j, Ds, BLOCK_D, PRECISION,
                            ACC)
        d_t, _ = _distances(t_ptr, tsg, tsn, tsd, g, ref, rows_i, valid_i, rows_j, valid_j, Dt, BLOCK_D, PRECISION,
                            ACC)
        if LOSS:
            h, slope = _huber_and_slope(d_s / tl.load(means_ptr + 2 * g) - d_t / tl.load(means_ptr + 2 * g + 1),
                                        delta)
            first, second = h, slope * d_s
        else:
            first, second = d_s, d_t
        out = out_ptr + (g.to(tl.int64) * tl.num_programs(1) + tile) * 2
        tl.store(out, tl.sum(tl.sum(tl.where(pairs, first, 0.0), axis=1), axis=0))
        tl.store(out + 1, tl.sum(tl.sum(tl.where(pairs, second, 0.0), axis=1), axis=0))


@autotune(_CONFIGS, key=["Ds", "Dt"], prune=_fitting, reset_to_zero=["acc_ptr"])  # acc: a scratch sum
@triton.jit
def _pair_grad_kernel(s_ptr, ssg, ssn, ssd, t_ptr, tsg, tsn, tsd, members_ptr, counts_ptr, queries_ptr, means_ptr,
                      coef_ptr, weight_ptr, row_offsets_ptr, acc_ptr, grad_ptr, gsg, gsn, gsd,
                      max_n, tiles, Ds, Dt, delta,
                      BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
                      ACC: tl.constexpr, ACC_PRECISION: tl.constexpr):
    g = tl.program_id(0)
    ti = tl.program_id(1)
    n = tl.load(counts_ptr + g)
    if (n >= 2) & (ti * BLOCK_N < tl.load(queries_ptr + g)):
        m_s = tl.load(means_ptr + 2 * g)
        m_t = tl.load(means_ptr + 2 * g + 1)
        c = tl.load(coef_ptr + g)
        w = 2.0 * tl.load(weight_ptr + g) / m_s
        s_base = s_ptr + g.to(tl.int64) * ssg
        # fp32 rows of (W X) for this tile, in a scratch buffer owned by this program (no atomics)
        i_local = ti * BLOCK_N + tl.arange(0, BLOCK_N)
        acc_rows = tl.load(row_offsets_ptr + g) + i_local.to(tl.int64)
        rowsum = tl.zeros([BLOCK_N], dtype=ACC)
        for tj in range(0, tiles):
            if tj * BLOCK_N < n:
                rows_i, valid_i, rows_j, valid_j, pairs, ref = _tile(members_ptr, counts_ptr, queries_ptr, max_n, g,
                                                                     ti, tj, BLOCK_N)
                d_s, clamped = _distances(s_ptr, ssg, ssn, ssd, g, ref, rows_i, valid_i, rows_j, valid_j, Ds,
                                          BLOCK_D, PRECISION, ACC)
                d_t, _ = _distances(t_ptr, tsg, tsn, tsd, g, ref, rows_i, valid_i, rows_j, valid_j, Dt, BLOCK_D,
                                    PRECISION, ACC)
                _, slope = _huber_and_slope(d_s / m_s - d_t / m_t, delta)
                weights = tl.where(pairs & (clamped == 0), w * (slope - c) / d_s, 0.0)
                rowsum += tl.sum(weights, axis=1)
                for d0 in range(0, Ds, BLOCK_D):
                    d = d0 + tl.arange(0, BLOCK_D)
                    in_d = d < Ds
                    x_j = _centered_rows(s_base, ssn, ssd, rows_j, valid_j, ref, d, in_d).to(ACC)
                    acc_ptrs = acc_ptr + acc_rows[:, None] * Ds + d[None, :]
                    io_mask = valid_i[:, None] & in_d[None, :]
                    partial = tl.dot(weights, x_j, input_precision=ACC_PRECISION, out_dtype=ACC)
                    tl.store(acc_ptrs, tl.load(acc_ptrs, mask=io_mask, other=0.0) + partial, mask=io_mask)
                    # the next read of these rows (next column tile, or the epilogue) may come from other threads
                    # of this program (Triton picks each access's thread layout): order it after this store
                    tl.debug_barrier()
        # grad_i = rowsum_i (x_i - ref) - sum_j W_ij (x_j - ref): the reference row cancels
        rows_i, valid_i, _, _, _, ref = _tile(members_ptr, counts_ptr, queries_ptr, max_n, g, ti, 0, BLOCK_N)
        for d0 in range(0, Ds, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            in_d = d < Ds
            io_mask = valid_i[:, None] & in_d[None, :]
            x_i = _centered_rows(s_base, ssn, ssd, rows_i, valid_i, ref, d, in_d).to(ACC)
            wx = tl.load(acc_ptr + acc_rows[:, None] * Ds + d[None, :], mask=io_mask, other=0.0)
            grad = rowsum[:, None] * x_i - wx
            tl.store(grad_ptr + g.to(tl.int64) * gsg + rows_i[:, None] * gsn + d[None, :] * gsd,
                     grad.to(grad_ptr.dtype.element_ty), mask=io_mask)


def _launch_options(dtype):
    """Dot precision for the input dtype (tf32x3 keeps fp32 accuracy on tensor cores) and accumulation."""
    acc = tl.float64 if dtype == torch.float64 else tl.float32
    return dict(PRECISION="tf32x3" if dtype == torch.float32 else "ieee", ACC=acc,
                BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D_FP32 if dtype == torch.float32 else BLOCK_D)


def _tiles(max_n: int) -> int:
    return max(triton.cdiv(max_n, BLOCK_N), 1)


class Packed(NamedTuple):
    """Variable-length member lists: members (G, max(max_n, 1)) int32 positions with each group's query members
    first, counts (G,) and queries (G,) int32, and two numbers read on the host (they size the grid)."""
    members: torch.Tensor
    counts: torch.Tensor
    queries: torch.Tensor
    max_n: int
    total_queries: int


def pack_groups(mask, local=None) -> Packed:
    """The groups of a (G, N) bool mask; query members are those in `local` (this rank's rows), or all. The op's
    one host sync: max_n and the total number of query members."""
    mask = mask.bool()
    counts = mask.sum(1, dtype=torch.int32)
    queries = counts if local is None else (mask & local).sum(1, dtype=torch.int32)
    if mask.shape[0] == 0 or mask.shape[1] == 0:
        return Packed(mask.new_zeros(mask.shape[0], 1, dtype=torch.int32), counts, queries, 0, 0)
    key = torch.where(mask, 0, 2).to(torch.int8)  # sort key: members first ...
    if local is not None:
        key += (mask & ~local).to(torch.int8)  # ... and among them this rank's own rows first
    max_n, total_queries = torch.stack([counts.max(), queries.sum()]).tolist()
    order = torch.argsort(key, dim=1, stable=True)[:, :max(max_n, 1)]
    return Packed(order.to(torch.int32).contiguous(), counts, queries, max_n, total_queries)


def _group_means(sums, counts, normalize: bool, mean_floor: float):
    """Normalising means (G, 2) [m_s, m_t] (1 without normalisation or for groups under 2 members) and
    whether the student mean is in the graph (not replaced by the floor)."""
    if not normalize:
        return torch.ones_like(sums), torch.zeros_like(sums[:, 0], dtype=torch.bool)
    pairs = (counts * (counts - 1)).to(sums.dtype)
    raw = sums / pairs.clamp(min=1)[:, None]
    means = torch.where((counts >= 2)[:, None], raw.clamp(min=mean_floor), torch.ones_like(raw))
    return means, (counts >= 2) & (raw[:, 0] > mean_floor)


def _group_scale(counts, reduction: str, dtype):
    """Per-group factor of each group's loss in the reduced loss (1 for "none")."""
    counted = counts >= 2
    if reduction == "official":
        return torch.where(counted, 1.0 / counts.clamp(min=1).to(dtype), 0.0)
    if reduction == "mean":
        pairs = torch.where(counted, counts * (counts - 1), 0).sum().clamp(min=1)
        return torch.ones(counts.shape, dtype=dtype, device=counts.device) / pairs.to(dtype)
    return torch.ones(counts.shape, dtype=dtype, device=counts.device)


def _pair_pass(student, teacher, packed: Packed, means, delta: float, loss: bool):
    """(G, 2) in the accumulation dtype over each group's ordered query pairs: [sum Ds, sum Dt] (pass 1) or,
    with `loss`, [sum h(u), sum h'(u) Ds] (pass 2)."""
    G, tiles = student.shape[0], _tiles(packed.max_n)
    partials = torch.zeros(G, tiles * tiles, 2, dtype=acc_dtype(student.dtype), device=student.device)
    if G:
        _pair_pass_kernel[(G, tiles * tiles)](
            student, *student.stride(), teacher, *teacher.stride(), packed.members, packed.counts, packed.queries,
            means, partials, packed.max_n, tiles, student.shape[2], teacher.shape[2], delta, LOSS=loss,
            **_launch_options(student.dtype))
    return partials.sum(1)  # fixed order: deterministic


def forward(student, teacher, mask, delta: float, normalize: bool, reduction: str, mean_floor: float, local=None,
            all_reduce=None):
    """(loss, stats (G, 3) [m_s, m_t, c], packing); over DDP, `local` marks this rank's rows and `all_reduce`
    sums the per-group partial sums across ranks between the passes."""
    packed = pack_groups(mask, local)
    sums = _pair_pass(student, teacher, packed, packed.counts, 0.0, loss=False)  # means unused in pass 1
    if all_reduce is not None:
        all_reduce(sums)
    means, mean_in_graph = _group_means(sums, packed.counts, normalize, mean_floor)
    huber_sums = _pair_pass(student, teacher, packed, means.contiguous(), delta, loss=True)
    if all_reduce is not None:
        all_reduce(huber_sums)
    coef = torch.where(mean_in_graph, huber_sums[:, 1] / sums[:, 0].clamp(min=1e-30), 0.0)
    losses = huber_sums[:, 0] * _group_scale(packed.counts, reduction, huber_sums.dtype)
    loss = (losses if reduction == "none" else losses.sum()).to(student.dtype)
    return loss, torch.cat([means, coef[:, None]], dim=1), packed


def backward(grad, student, teacher, mask, stats, delta: float, reduction: str, packed: Packed = None):
    """Gradient w.r.t. student (same shape and strides; zero outside the query members), reusing the forward's
    packing when given (else packing again: one more sync)."""
    packed = pack_groups(mask) if packed is None else packed
    G, tiles = student.shape[0], _tiles(packed.max_n)
    weight = (grad.to(stats.dtype) * _group_scale(packed.counts, reduction, stats.dtype)).expand(G).contiguous()
    out = torch.zeros_like(student)
    if G and packed.total_queries:
        row_offsets = (torch.cumsum(packed.queries, 0) - packed.queries).to(torch.int64)
        acc = torch.zeros(packed.total_queries, student.shape[2], dtype=acc_dtype(student.dtype), device=out.device)
        _pair_grad_kernel[(G, tiles)](
            student, *student.stride(), teacher, *teacher.stride(), packed.members, packed.counts, packed.queries,
            stats[:, :2].contiguous(), stats[:, 2].contiguous(), weight, row_offsets, acc, out, *out.stride(),
            packed.max_n, tiles, student.shape[2], teacher.shape[2], delta,
            ACC_PRECISION="ieee" if student.dtype == torch.float64 else "tf32x3", **_launch_options(student.dtype))
    return out
