"""CPU path of the TaT attention + MSE loss: the math of ``tat_attention_loss_triton`` (same signatures) in batched
matmuls over all batch items at once, chunked over queries so that the (B, rows, M) logits of one chunk stay under
CHUNK_ELEMENTS whatever the map size (no O(N * M) memory); a map that fits in one chunk (the papers' 7 x 7 maps)
takes a dozen torch calls per direction. The backward recomputes P = exp(s q k^T - lse) per chunk (as the Triton
kernels do); dK and dV accumulate over chunks in a fixed order."""
import torch

from fastkd.kernels.common import acc_dtype

CHUNK_ELEMENTS = 1 << 22  # logits per query chunk (16 MiB in fp32), at least one query row


def _query_chunks(B: int, N: int, M: int):
    rows = max(1, CHUNK_ELEMENTS // max(B * M, 1))
    return [slice(start, min(start + rows, N)) for start in range(0, max(N, 1), rows)]  # one, maybe empty, at least


def _logits(query, key_t, scale: float):
    logits = torch.bmm(query, key_t)
    return logits if scale == 1.0 else logits.mul_(scale)


def _forward_rows(query, key_t, value, target, scale: float, store_residual: bool):
    """(losses (B,), lse, rowdot, residual) of a set of query rows, in the accumulation dtype."""
    logits = _logits(query, key_t, scale)
    p = torch.softmax(logits, -1)
    lse = logits.amax(-1) - p.amax(-1).log()  # at the largest logit, p = exp(s - lse) >= 1 / M
    err = torch.baddbmm(target, p, value, beta=-1)  # O - t
    squares = torch.linalg.vecdot(err, err)
    if not store_residual:
        return squares.sum(-1), lse, None, None
    return squares.sum(-1), lse, squares + torch.linalg.vecdot(err, target), err  # E.O = E.E + E.t


def tat_forward(query, key, value, target, scale: float, store_residual: bool):
    """Per batch item losses sum E^2 (B,) and lse (B, N) (accumulation dtype); with `store_residual` (else
    empty) rowdot = sum_c E O (B, N) and the residual E = O - t (B, N, Cv) in the input dtype."""
    B, N, _ = query.shape
    acc = acc_dtype(query.dtype)
    key_t, value_acc = key.to(acc).transpose(1, 2), value.to(acc)
    chunks = _query_chunks(B, N, key.shape[1])
    if len(chunks) == 1:  # no slicing: a few microseconds per view count at the papers' shapes
        losses, lse, rowdot, residual = _forward_rows(query.to(acc), key_t, value_acc, target.to(acc), scale,
                                                      store_residual)
    else:
        parts = [_forward_rows(query[:, rows].to(acc), key_t, value_acc, target[:, rows].to(acc), scale,
                               store_residual) for rows in chunks]
        losses = torch.stack([p[0] for p in parts]).sum(0)
        lse, rowdot, residual = (torch.cat([p[i] for p in parts], 1) if store_residual or i == 1 else None
                                 for i in (1, 2, 3))
    if not store_residual:
        return losses, lse, lse.new_empty(0), query.new_empty(0)
    return losses, lse, rowdot, residual.to(query.dtype)


def _backward_rows(query, err, lse, rowdot, key, key_t, value_t, scale: float):
    """(dq, dk, dv) contributions of a set of query rows; err and rowdot already carry the weights w_b."""
    p = _logits(query, key_t, scale).sub_(lse[..., None]).exp_()
    ds = torch.bmm(err, value_t).sub_(rowdot[..., None]).mul_(p)
    if scale != 1.0:
        ds.mul_(scale)
    return torch.bmm(ds, key), torch.bmm(ds.transpose(1, 2), query), torch.bmm(p.transpose(1, 2), err)


def tat_backward(weight, query, key, value, residual, lse, rowdot, scale: float):
    """(dq, dk, dv) for per batch item weights w_b (dL/dO = w_b E):
    dV = w P^T E, dQ = w s dS' K, dK = w s dS'^T Q with dS' = P (E V^T - rowdot)."""
    B, N, _ = query.shape
    acc = acc_dtype(query.dtype)
    key_acc = key.to(acc)
    key_t, value_t = key_acc.transpose(1, 2), value.to(acc).transpose(1, 2)
    chunks = _query_chunks(B, N, key.shape[1])
    if len(chunks) == 1:
        dq, dk, dv = _backward_rows(query.to(acc), residual.to(acc) * weight[:, None, None], lse,
                                    rowdot * weight[:, None], key_acc, key_t, value_t, scale)
    else:
        parts = [_backward_rows(query[:, rows].to(acc), residual[:, rows].to(acc) * weight[:, None, None], lse[:, rows],
                                rowdot[:, rows] * weight[:, None], key_acc, key_t, value_t, scale) for rows in chunks]
        dq = torch.cat([p[0] for p in parts], 1)
        dk, dv = (torch.stack([p[i] for p in parts]).sum(0) for i in (1, 2))  # fixed order
    return dq.to(query.dtype), dk.to(key.dtype), dv.to(value.dtype)
