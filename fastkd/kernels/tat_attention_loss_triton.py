"""Triton kernels for TaT's one-to-all attention fused with its MSE: softmax(s q k^T) v against a target.

Shapes: q (B, N, Cq), k (B, M, Cq), v (B, M, Cv), t (B, N, Cv), all read in place through their strides. Per
batch item: logits S = s q k^T (N, M), P = softmax over keys, O = P v, E = O - t, loss_b = sum E^2. Neither
S, P nor O is ever written to memory; channels of any width are tiled (QK^T accumulates over Cq chunks).

Forward, one program per (batch item, BLOCK_M queries), two layouts:
  * all keys fit one tile (M <= SMALL_TOKENS: patch groups, 7x7 classification maps): P is computed once,
    exactly, and the program loops over Cv chunks (O_c = P V_c): no recomputation at any Cv.
  * otherwise online softmax over key tiles with an O accumulator (BLOCK_M, BLOCK_CV) in registers; Cv wider
    than BLOCK_CV (128) is split over a second grid axis, each Cv tile recomputing QK^T (extra cost
    (Cv / BLOCK_CV - 1) QK^T). A (BLOCK_M, Cv) accumulator would not fit in registers and round-tripping it
    through memory per key tile costs more traffic; the TaT shapes with many keys (anchor points, full maps)
    have Cv = 256: two tiles (a 256-wide fp16/bf16 tile spilled on sm_80 with Triton 3.6).
  It stores per row lse = log sum_j exp(S_ij) and rowdot = sum_c E O (fp32), per program one loss partial
  (summed afterwards in a fixed order: deterministic), and, when a gradient is needed, E itself (B, N, Cv) in
  the input dtype: dO = w_b E with w_b = 2 * upstream grad * reduction factor, so E is all the backward
  needs of O; recomputing it would cost a second forward, storing it costs one tensor the size of t.

Backward (flash-style recomputation of P from lse; with dP' = E V^T and dS' = P (dP' - rowdot)):
  dV = w P^T E,  dQ = w s dS' K,  dK = w s dS'^T Q.
  * N, M <= SMALL_TOKENS: one program per batch item computes P and dS' once and loops over channel chunks
    for all three gradients (no recomputation, no atomics).
  * otherwise two kernels: per key tile (dK, dV over a channel tile, looping over query tiles) and per
    query tile (dQ over a channel tile, looping over key tiles); channel tiles wider than BLOCK_C split over
    the grid and recompute S and dP'. No atomics: deterministic.
Dots accumulate in fp32 (fp64 for fp64 inputs); fp32 inputs use tf32x3 (fp32 accuracy on tensor cores),
fp16/bf16 operands go to tensor cores as they are, P and dS' cast to them as in FlashAttention.
"""
import torch
import triton
import triton.language as tl

from fastkd.kernels.common import acc_dtype
from fastkd.kernels.triton_utils import autotune, compute_dtype

SMALL_TOKENS = 64  # key (forward) or key and query (backward) counts handled by one tile

# Block sizes per operand size in bytes (fp64 takes the fp32 ones; it only serves float64 checks). Chosen so
# that every kernel and every warp candidate below compiles for sm_90 and sm_80 without register spills, with
# Triton 3.6 and 3.8, inputs contiguous along channels or along tokens (benchmarks/aot.py checks it in the tests).
# tf32x3 splits each fp32 operand in two, hence the smaller fp32 tiles (a 32-query one-tile forward: 64 spilled
# 500+ bytes on sm_80). They size the grid, so they are chosen here, not autotuned. Measured with Triton 3.6 (the
# tighter one): fp16/bf16 forward (32, 64, 256) spilled 96-120 bytes on sm_80, dK/dV (64, 32, 256) 16-56 bytes;
# fp32 dK/dV (32, 16, 128) 16-36 bytes on sm_80, dQ with 32-channel S chunks 24-36 bytes. Keys:
#   k: channel chunk of the S = q k^T and dP' = E v^T reductions    chunk: output channel chunk, one-tile layouts
#   one_tile_queries: query tile of the one-tile forward
#   backward_k: channel chunk of the S and dP' reductions in the split backward (fp32: 32 spilled 16-36 bytes)
#   small_backward_precision: the one-program backward holds P and dS' (64 x 64) for all its dots; with tf32x3
#     operands (each split in two) it spilled 70-220 bytes on sm_80 whatever the chunks, so fp32 runs its dots as
#     exact fp32 FMAs there (more accurate than tf32x3; slower per FLOP, and these shapes are small)
#   forward, dkdv, dq: (query tile, key tile, channel tile) of the general layouts
# fp32's one-program backward (exact FMA dots) compiles without spills as 4 warps with 32-channel S chunks under
# Triton 3.6 (8 warps with 16-channel chunks spilled 84 bytes there), and as 8 warps with 16-channel chunks under
# Triton 3.8 (4 warps spilled 304 bytes): each version gets the setting that fits it (3.7 not checked).
_NEWER_PTXAS_CHOICES = tuple(int(x) for x in triton.__version__.split(".")[:2]) >= (3, 7)

_BLOCKS = {
    2: dict(k=64, chunk=64, small_backward_chunk=64, one_tile_queries=64,
            forward=(32, 64, 128), dkdv=(32, 32, 256), dq=(64, 32, 256)),
    4: dict(k=32, chunk=64, small_backward_chunk=16, one_tile_queries=32, small_backward_precision="ieee",
            backward_k=16, small_backward_k=16 if _NEWER_PTXAS_CHOICES else 32,
            forward=(32, 32, 128), dkdv=(32, 16, 64), dq=(32, 32, 128)),
}

# Warps: autotuned on a GPU among the candidates that fit the launch's tile (first one under the interpreter),
# keyed by the token counts and channel widths (fixed in a training run: no retuning in steady state).
_CONFIGS = [triton.Config({}, num_warps=8, num_stages=3), triton.Config({}, num_warps=4, num_stages=3)]
_KEY = ["N", "M", "Cq", "Cv"]


def _fitting(configs, args):
    """Candidates that compile without spills (benchmarks/aot.py, Triton 3.6 and 3.8, sm_80 and sm_90): fp32 with
    tf32x3 (each operand held twice) 8 warps except 16 x 16 tiles (4 spilled); fp32 with exact FMA dots (the
    one-program backward) as _NEWER_PTXAS_CHOICES says; fp16/bf16 4 warps below 1024-element tiles
    and 8 from there (4 spilled 16-420 bytes, dK/dV's 32 x 32 tile too)."""
    tile = args["BLOCK_M"] * args["BLOCK_N"]
    if args["PRECISION"] == "tf32x3":
        warps = 4 if tile <= 256 else 8
    elif args["q_ptr"].dtype == torch.float32:
        warps = 8 if _NEWER_PTXAS_CHOICES else 4
    else:
        warps = 4 if tile < 1024 else 8
    kept = [c for c in configs if c.num_warps == warps]
    return kept or configs[:1]


def _tuned(kernel):
    return autotune(_CONFIGS, _KEY, prune=_fitting)(kernel)


@triton.jit
def _row_dots(a_base, s_an, s_ac, rows, valid_rows, b_base, s_bn, s_bc, cols, valid_cols, C,
              BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr):
    """(len(rows), len(cols)) tile of a[rows] . b[cols] over C channels, accumulated in chunks of BLOCK_K."""
    out = tl.zeros([rows.shape[0], cols.shape[0]], dtype=ACC)
    for c0 in range(0, C, BLOCK_K):
        c = c0 + tl.arange(0, BLOCK_K)
        in_c = c < C
        a = tl.load(a_base + rows[:, None] * s_an + c[None, :] * s_ac, mask=valid_rows[:, None] & in_c[None, :],
                    other=0.0)
        b = tl.load(b_base + cols[:, None] * s_bn + c[None, :] * s_bc, mask=valid_cols[:, None] & in_c[None, :],
                    other=0.0)
        out += tl.dot(a, tl.trans(b), input_precision=PRECISION, out_dtype=ACC)
    return out


@triton.jit
def _load_tile(base, s_n, s_c, rows, valid_rows, c, valid_c):
    return tl.load(base + rows[:, None] * s_n + c[None, :] * s_c, mask=valid_rows[:, None] & valid_c[None, :],
                   other=0.0)


@triton.jit
def _store_tile(base, s_n, s_c, rows, valid_rows, c, valid_c, value):
    tl.store(base + rows[:, None] * s_n + c[None, :] * s_c, value.to(base.dtype.element_ty),
             mask=valid_rows[:, None] & valid_c[None, :])


@triton.jit
def _residual_epilogue(o, t_base, s_tn, s_tc, r_base, s_rn, s_rc, rows, valid_rows, c, Cv, loss_rows, rowdot,
                       STORE_RESIDUAL: tl.constexpr, ACC: tl.constexpr):
    """E = O - t on a (rows, c) tile: adds sum_c E^2 and sum_c E O per row, stores E if asked."""
    valid_c = c < Cv
    t = _load_tile(t_base, s_tn, s_tc, rows, valid_rows, c, valid_c).to(ACC)
    e = tl.where(valid_rows[:, None] & valid_c[None, :], o - t, 0.0)
    if STORE_RESIDUAL:
        _store_tile(r_base, s_rn, s_rc, rows, valid_rows, c, valid_c, e)
    return loss_rows + tl.sum(e * e, axis=1), rowdot + tl.sum(e * o, axis=1)


@_tuned
@triton.jit
def _forward_kernel(q_ptr, s_qb, s_qn, s_qc, k_ptr, s_kb, s_kn, s_kc, v_ptr, s_vb, s_vn, s_vc,
                    t_ptr, s_tb, s_tn, s_tc, r_ptr, s_rb, s_rn, s_rc, lse_ptr, rowdot_ptr, loss_ptr,
                    B, N, M, Cq, Cv, scale, row_tiles,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_CV: tl.constexpr,
                    ONE_KEY_TILE: tl.constexpr, STORE_RESIDUAL: tl.constexpr, PRECISION: tl.constexpr,
                    ACC: tl.constexpr):
    pid = tl.program_id(0)
    pid_c = tl.program_id(1)
    b = (pid // row_tiles).to(tl.int64)
    rows = (pid % row_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    valid_rows = rows < N
    q_base, k_base, v_base = q_ptr + b * s_qb, k_ptr + b * s_kb, v_ptr + b * s_vb
    t_base, r_base = t_ptr + b * s_tb, r_ptr + b * s_rb
    loss_rows = tl.zeros([BLOCK_M], dtype=ACC)
    rowdot = tl.zeros([BLOCK_M], dtype=ACC)
    if ONE_KEY_TILE:
        cols = tl.arange(0, BLOCK_N)
        valid_cols = cols < M
        s = _row_dots(q_base, s_qn, s_qc, rows, valid_rows, k_base, s_kn, s_kc, cols, valid_cols, Cq,
                      BLOCK_K, PRECISION, ACC) * scale
        s = tl.where(valid_cols[None, :], s, float("-inf"))
        m_i = tl.max(s, axis=1)
        p = tl.exp(s - m_i[:, None])
        l_i = tl.sum(p, axis=1)
        p = p / l_i[:, None]
        for c0 in range(0, Cv, BLOCK_CV):
            c = c0 + tl.arange(0, BLOCK_CV)
            v = _load_tile(v_base, s_vn, s_vc, cols, valid_cols, c, c < Cv)
            o = tl.dot(p.to(v.dtype), v, input_precision=PRECISION, out_dtype=ACC)
            loss_rows, rowdot = _residual_epilogue(o, t_base, s_tn, s_tc, r_base, s_rn, s_rc, rows, valid_rows, c,
                                                   Cv, loss_rows, rowdot, STORE_RESIDUAL, ACC)
    else:
        c = pid_c * BLOCK_CV + tl.arange(0, BLOCK_CV)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=ACC)
        l_i = tl.zeros([BLOCK_M], dtype=ACC)
        acc = tl.zeros([BLOCK_M, BLOCK_CV], dtype=ACC)
        for j0 in range(0, M, BLOCK_N):
            cols = j0 + tl.arange(0, BLOCK_N)
            valid_cols = cols < M
            s = _row_dots(q_base, s_qn, s_qc, rows, valid_rows, k_base, s_kn, s_kc, cols, valid_cols, Cq,
                          BLOCK_K, PRECISION, ACC) * scale
            s = tl.where(valid_cols[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = _load_tile(v_base, s_vn, s_vc, cols, valid_cols, c, c < Cv)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION, out_dtype=ACC)
            m_i = m_new
        loss_rows, rowdot = _residual_epilogue(acc / l_i[:, None], t_base, s_tn, s_tc, r_base, s_rn, s_rc, rows,
                                               valid_rows, c, Cv, loss_rows, rowdot, STORE_RESIDUAL, ACC)
    tl.store(loss_ptr + pid * tl.num_programs(1) + pid_c, tl.sum(loss_rows, axis=0))
    tl.store(rowdot_ptr + (pid_c * B + b) * N + rows, rowdot, mask=valid_rows)
    if pid_c == 0:
        tl.store(lse_ptr + b * N + rows, m_i + tl.log(l_i), mask=valid_rows)


@_tuned
@triton.jit
def _backward_small_kernel(q_ptr, s_qb, s_qn, s_qc, k_ptr, s_kb, s_kn, s_kc, v_ptr, s_vb, s_vn, s_vc,
                           r_ptr, s_rb, s_rn, s_rc, lse_ptr, rowdot_ptr, weight_ptr,
                           dq_ptr, s_dqb, s_dqn, s_dqc, dk_ptr, s_dkb, s_dkn, s_dkc, dv_ptr, s_dvb, s_dvn, s_dvc,
                           N, M, Cq, Cv, scale,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           BLOCK_C: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr):
    """All of one batch item (N, M <= one tile): P and dS' once, then every gradient chunk by chunk."""
    b = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, BLOCK_M)
    valid_rows = rows < N
    cols = tl.arange(0, BLOCK_N)
    valid_cols = cols < M
    q_base, k_base, v_base, r_base = q_ptr + b * s_qb, k_ptr + b * s_kb, v_ptr + b * s_vb, r_ptr + b * s_rb
    s = _row_dots(q_base, s_qn, s_qc, rows, valid_rows, k_base, s_kn, s_kc, cols, valid_cols, Cq,
                  BLOCK_K, PRECISION, ACC) * scale
    lse = tl.load(lse_ptr + b * N + rows, mask=valid_rows, other=0.0)
    p = tl.where(valid_rows[:, None] & valid_cols[None, :], tl.exp(s - lse[:, None]), 0.0)
    w = tl.load(weight_ptr + b)
    # one gradient per loop, in the order that keeps the fewest (BLOCK_M, BLOCK_N) tiles alive (P, then dS')
    for c0 in range(0, Cv, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        e = _load_tile(r_base, s_rn, s_rc, rows, valid_rows, c, c < Cv)
        dv = tl.dot(tl.trans(p).to(e.dtype), e, input_precision=PRECISION, out_dtype=ACC)
        _store_tile(dv_ptr + b * s_dvb, s_dvn, s_dvc, cols, valid_cols, c, c < Cv, dv * w)
    dp = _row_dots(r_base, s_rn, s_rc, rows, valid_rows, v_base, s_vn, s_vc, cols, valid_cols, Cv,
                   BLOCK_K, PRECISION, ACC)
    ds = p * (dp - tl.load(rowdot_ptr + b * N + rows, mask=valid_rows, other=0.0)[:, None])
    for c0 in range(0, Cq, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        k = _load_tile(k_base, s_kn, s_kc, cols, valid_cols, c, c < Cq)
        dq = tl.dot(ds.to(k.dtype), k, input_precision=PRECISION, out_dtype=ACC)
        _store_tile(dq_ptr + b * s_dqb, s_dqn, s_dqc, rows, valid_rows, c, c < Cq, dq * (w * scale))
    for c0 in range(0, Cq, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        q = _load_tile(q_base, s_qn, s_qc, rows, valid_rows, c, c < Cq)
        dk = tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=PRECISION, out_dtype=ACC)
        _store_tile(dk_ptr + b * s_dkb, s_dkn, s_dkc, cols, valid_cols, c, c < Cq, dk * (w * scale))


@triton.jit
def _backward_program(tiles, size, BLOCK: tl.constexpr, BLOCK_C: tl.constexpr):
    """This backward program's batch item, token tile (indices, validity against `size`) and channel tile."""
    pid = tl.program_id(0)
    index = (pid % tiles) * BLOCK + tl.arange(0, BLOCK)
    return (pid // tiles).to(tl.int64), index, index < size, tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)


@_tuned
@triton.jit
def _backward_dkdv_kernel(q_ptr, s_qb, s_qn, s_qc, k_ptr, s_kb, s_kn, s_kc, v_ptr, s_vb, s_vn, s_vc,
                          r_ptr, s_rb, s_rn, s_rc, lse_ptr, rowdot_ptr, weight_ptr,
                          dk_ptr, s_dkb, s_dkn, s_dkc, dv_ptr, s_dvb, s_dvn, s_dvc,
                          N, M, Cq, Cv, scale, col_tiles,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          BLOCK_C: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr):
    """dK, dV of one key tile over one channel tile, looping over query tiles (S^T and dP'^T recomputed)."""
    b, cols, valid_cols, c = _backward_program(col_tiles, M, BLOCK_N, BLOCK_C)
    q_base, k_base, v_base, r_base = q_ptr + b * s_qb, k_ptr + b * s_kb, v_ptr + b * s_vb, r_ptr + b * s_rb
    dk = tl.zeros([BLOCK_N, BLOCK_C], dtype=ACC)
    dv = tl.zeros([BLOCK_N, BLOCK_C], dtype=ACC)
    for i0 in range(0, N, BLOCK_M):
        rows = i0 + tl.arange(0, BLOCK_M)
        valid_rows = rows < N
        s_t = _row_dots(k_base, s_kn, s_kc, cols, valid_cols, q_base, s_qn, s_qc, rows, valid_rows, Cq,
                        BLOCK_K, PRECISION, ACC) * scale
        lse = tl.load(lse_ptr + b * N + rows, mask=valid_rows, other=0.0)
        p_t = tl.where(valid_cols[:, None] & valid_rows[None, :], tl.exp(s_t - lse[None, :]), 0.0)
        dp_t = _row_dots(v_base, s_vn, s_vc, cols, valid_cols, r_base, s_rn, s_rc, rows, valid_rows, Cv,
                         BLOCK_K, PRECISION, ACC)
        ds_t = p_t * (dp_t - tl.load(rowdot_ptr + b * N + rows, mask=valid_rows, other=0.0)[None, :])
        e = _load_tile(r_base, s_rn, s_rc, rows, valid_rows, c, c < Cv)
        dv += tl.dot(p_t.to(e.dtype), e, input_precision=PRECISION, out_dtype=ACC)
        q = _load_tile(q_base, s_qn, s_qc, rows, valid_rows, c, c < Cq)
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION, out_dtype=ACC)
    w = tl.load(weight_ptr + b)
    _store_tile(dv_ptr + b * s_dvb, s_dvn, s_dvc, cols, valid_cols, c, c < Cv, dv * w)
    _store_tile(dk_ptr + b * s_dkb, s_dkn, s_dkc, cols, valid_cols, c, c < Cq, dk * (w * scale))


@_tuned
@triton.jit
def _backward_dq_kernel(q_ptr, s_qb, s_qn, s_qc, k_ptr, s_kb, s_kn, s_kc, v_ptr, s_vb, s_vn, s_vc,
                        r_ptr, s_rb, s_rn, s_rc, lse_ptr, rowdot_ptr, weight_ptr, dq_ptr, s_dqb, s_dqn, s_dqc,
                        N, M, Cq, Cv, scale, row_tiles,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        BLOCK_C: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr):
    """dQ of one query tile over one channel tile, looping over key tiles (S and dP' recomputed)."""
    b, rows, valid_rows, c = _backward_program(row_tiles, N, BLOCK_M, BLOCK_C)
    q_base, k_base, v_base, r_base = q_ptr + b * s_qb, k_ptr + b * s_kb, v_ptr + b * s_vb, r_ptr + b * s_rb
    lse = tl.load(lse_ptr + b * N + rows, mask=valid_rows, other=0.0)
    rowdot = tl.load(rowdot_ptr + b * N + rows, mask=valid_rows, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_C], dtype=ACC)
    for j0 in range(0, M, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        valid_cols = cols < M
        s = _row_dots(q_base, s_qn, s_qc, rows, valid_rows, k_base, s_kn, s_kc, cols, valid_cols, Cq,
                      BLOCK_K, PRECISION, ACC) * scale
        p = tl.where(valid_cols[None, :], tl.exp(s - lse[:, None]), 0.0)
        dp = _row_dots(r_base, s_rn, s_rc, rows, valid_rows, v_base, s_vn, s_vc, cols, valid_cols, Cv,
                       BLOCK_K, PRECISION, ACC)
        ds = p * (dp - rowdot[:, None])
        k = _load_tile(k_base, s_kn, s_kc, cols, valid_cols, c, c < Cq)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION, out_dtype=ACC)
    _store_tile(dq_ptr + b * s_dqb, s_dqn, s_dqc, rows, valid_rows, c, c < Cq, dq * (tl.load(weight_ptr + b) * scale))


def _blocks(dtype) -> dict:
    return _BLOCKS[min(dtype.itemsize, 4)]


def _tile(size: int) -> int:
    """Power-of-two tile covering `size` tokens of a one-tile layout (at least 16, the smallest tl.dot operand)."""
    return max(triton.next_power_of_2(size), 16)


def _options(dtype, precision=None, block_k=None):
    """Dot precision (tf32x3 for fp32 unless `precision` says otherwise), accumulation dtype, reduction chunk."""
    default = "tf32x3" if dtype == torch.float32 else "ieee"
    return dict(PRECISION=precision or default, ACC=compute_dtype(dtype), BLOCK_K=block_k or _blocks(dtype)["k"])


def tat_forward(query, key, value, target, scale: float, store_residual: bool):
    """Per batch item losses sum E^2 (B,) and lse (B, N) (accumulation dtype); with `store_residual` (else
    empty) rowdot = sum_c E O (B, N) and the residual E = O - t (B, N, Cv) in the input dtype."""
    B, N, Cq = query.shape
    M, Cv = value.shape[1], value.shape[2]
    acc, blocks = acc_dtype(query.dtype), _blocks(query.dtype)
    one_key_tile = M <= SMALL_TOKENS
    if one_key_tile:
        block_m, block_n, block_cv = min(_tile(N), blocks["one_tile_queries"]), _tile(M), blocks["chunk"]
    else:
        block_m, block_n, block_cv = blocks["forward"]
    row_tiles = triton.cdiv(N, block_m)
    channel_tiles = 1 if one_key_tile else max(triton.cdiv(Cv, block_cv), 1)
    residual = torch.empty((B, N, Cv), dtype=query.dtype, device=query.device) if store_residual else None
    lse = torch.empty((B, N), dtype=acc, device=query.device)
    rowdot = torch.empty((channel_tiles, B, N), dtype=acc, device=query.device)
    losses = torch.zeros((B, row_tiles * channel_tiles), dtype=acc, device=query.device)
    if B * row_tiles:
        _forward_kernel[(B * row_tiles, channel_tiles)](
            query, *query.stride(), key, *key.stride(), value, *value.stride(), target, *target.stride(),
            *((residual, *residual.stride()) if store_residual else (query, 0, 0, 0)),  # query: an unused stand-in
            lse, rowdot, losses, B, N, M, Cq, Cv, scale, row_tiles,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_CV=block_cv, ONE_KEY_TILE=one_key_tile,
            STORE_RESIDUAL=store_residual, **_options(query.dtype))
    if not store_residual:
        return losses.sum(1), lse, rowdot.new_empty(0), query.new_empty(0)
    return losses.sum(1), lse, rowdot.sum(0), residual


def tat_backward(weight, query, key, value, residual, lse, rowdot, scale: float):
    """(dq, dk, dv), contiguous, for per batch item weights w_b (dL/dO = w_b E)."""
    B, N, Cq = query.shape
    M, Cv = value.shape[1], value.shape[2]
    blocks = _blocks(query.dtype)
    dq, dk, dv = (x.new_empty(x.shape) for x in (query, key, value))
    if B * N * M == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    inputs = (query, *query.stride(), key, *key.stride(), value, *value.stride(), residual, *residual.stride(),
              lse, rowdot, weight)
    if N <= SMALL_TOKENS and M <= SMALL_TOKENS:
        block_m, block_n = _tile(N), _tile(M)
        _backward_small_kernel[(B,)](
            *inputs, dq, *dq.stride(), dk, *dk.stride(), dv, *dv.stride(), N, M, Cq, Cv, scale,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_C=blocks["small_backward_chunk"],
            **_options(query.dtype, blocks.get("small_backward_precision"), blocks.get("small_backward_k")))
        return dq, dk, dv
    block_m, block_n, block_c = blocks["dkdv"]
    col_tiles = triton.cdiv(M, block_n)
    _backward_dkdv_kernel[(B * col_tiles, max(triton.cdiv(max(Cq, Cv), block_c), 1))](
        *inputs, dk, *dk.stride(), dv, *dv.stride(), N, M, Cq, Cv, scale, col_tiles,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_C=block_c,
        **_options(query.dtype, block_k=blocks.get("backward_k")))
    block_m, block_n, block_c = blocks["dq"]
    row_tiles = triton.cdiv(N, block_m)
    _backward_dq_kernel[(B * row_tiles, max(triton.cdiv(Cq, block_c), 1))](
        *inputs, dq, *dq.stride(), N, M, Cq, Cv, scale, row_tiles,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_C=block_c,
        **_options(query.dtype, block_k=blocks.get("backward_k")))
    return dq, dk, dv
