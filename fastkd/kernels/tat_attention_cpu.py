"""CPU path of the TaT attention + MSE loss: the math of ``tat_attention_triton`` (same signatures) in
batched matmuls over all batch items at once, chunked over queries so that the (B, rows, M) logits of one chunk
stay under CHUNK_ELEMENTS whatever the map size (no O(N * M) memory). P comes from torch's fused softmax; the
backward recomputes it per chunk (as the Triton kernels recompute it from lse); dK and dV accumulate over
chunks in a fixed order."""
import torch

from fastkd.kernels.common import acc_dtype

CHUNK_ELEMENTS = 1 << 22  # logits per query chunk (16 MiB in fp32), at least one query row


def _query_chunks(B: int, N: int, M: int):
    rows = max(1, CHUNK_ELEMENTS // max(B * M, 1))
    return [slice(start, min(start + rows, N)) for start in range(0, N, rows)]


def _attention(query, key_t, scale: float):
    """(logits s q k^T, P = softmax over keys) of one query chunk."""
    logits = torch.bmm(query, key_t)
    if scale != 1.0:
        logits.mul_(scale)
    return logits, torch.softmax(logits, dim=-1)


def tat_forward(query, key, value, target, scale: float, store_residual: bool):
    """Per batch item losses sum E^2 (B,) and lse (B, N) (accumulation dtype); with `store_residual` (else
    empty) rowdot = sum_c E O (B, N) and the residual E = O - t (B, N, Cv) in the input dtype."""
    B, N, _ = query.shape
    M = key.shape[1]
    acc = acc_dtype(query.dtype)
    key_t, value_acc = key.to(acc).transpose(1, 2), value.to(acc)
    losses = query.new_zeros(B, dtype=acc)
    lse = query.new_empty((B, N), dtype=acc)
    rowdot = torch.empty_like(lse) if store_residual else lse.new_empty(0)
    residual = query.new_empty(target.shape) if store_residual else query.new_empty(0)
    for rows in _query_chunks(B, N, M):
        logits, p = _attention(query[:, rows].to(acc), key_t, scale)
        lse[:, rows] = logits.amax(-1) - p.amax(-1).log()  # at the largest logit, p = exp(s - lse) >= 1 / M
        target_rows = target[:, rows].to(acc)
        err = torch.baddbmm(target_rows, p, value_acc, beta=-1)  # O - t
        squares = torch.linalg.vector_norm(err, dim=-1).square_()
        losses += squares.sum(-1)
        if store_residual:
            rowdot[:, rows] = squares + (err * target_rows).sum(-1)  # E.O = E.E + E.t
            residual[:, rows] = err
    return losses, lse, rowdot, residual


def tat_backward(weight, query, key, value, residual, lse, rowdot, scale: float):
    """(dq, dk, dv) with the strides of query, key, value, for per batch item weights w_b (dL/dO = w_b E):
    dV = w P^T E, dQ = w s dS' K, dK = w s dS'^T Q with dS' = P (E V^T - rowdot)."""
    B, N, _ = query.shape
    M = key.shape[1]
    acc = acc_dtype(query.dtype)
    key_acc = key.to(acc)
    key_t, value_t = key_acc.transpose(1, 2), value.to(acc).transpose(1, 2)
    dq = torch.empty_like(query)
    dk = torch.zeros_like(key, dtype=acc)
    dv = torch.zeros_like(value, dtype=acc)
    for rows in _query_chunks(B, N, M):
        q, err = query[:, rows].to(acc), residual[:, rows].to(acc)
        _, p = _attention(q, key_t, scale)
        ds = torch.bmm(err, value_t).sub_(rowdot[:, rows, None]).mul_(p).mul_(weight[:, None, None] * scale)
        dq[:, rows] = torch.bmm(ds, key_acc)
        dk.baddbmm_(ds.transpose(1, 2), q)
        dv.baddbmm_(p.transpose(1, 2), err)
    return dq, dk.to(key.dtype), dv.mul_(weight[:, None, None]).to(value.dtype)
