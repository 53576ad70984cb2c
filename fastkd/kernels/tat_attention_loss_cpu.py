"""CPU path of the TaT attention + MSE loss: the math of ``tat_attention_loss_triton`` (same signatures) in batched
matmuls over all batch items at once, chunked over queries so that the (B, rows, M) logits of one chunk stay under
CHUNK_ELEMENTS whatever the map size (no O(N * M) memory); a map that fits in one chunk (the papers' 7 x 7 maps)
takes a dozen torch calls per direction. The backward recomputes P = exp(s q k^T - lse) per chunk (as the Triton
kernels do); dK and dV accumulate over chunks in a fixed order. The eager autograd path calls
`tat_forward_with_grad` instead: the gradients for a unit weight in the forward pass (P and E still at hand, the
backward a multiply by the weights), as many matmuls as eager softmax + mse and no recomputation."""
import torch

from fastkd.kernels.common import acc_dtype

CHUNK_ELEMENTS = 1 << 22  # logits per query chunk (16 MiB in fp32), at least one query row


def _query_chunks(B: int, N: int, M: int):
    rows = max(1, CHUNK_ELEMENTS // max(B * M, 1))
    return [slice(start, min(start + rows, N)) for start in range(0, max(N, 1), rows)]  # one, maybe empty, at least


def _to(x, dtype):
    return x if x.dtype == dtype else x.to(dtype)  # .to() costs microseconds even when it changes nothing


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
    key_t, value_acc = _to(key, acc).transpose(1, 2), _to(value, acc)
    chunks = _query_chunks(B, N, key.shape[1])
    if len(chunks) == 1:  # no slicing: a few microseconds per view count at the papers' shapes
        losses, lse, rowdot, residual = _forward_rows(_to(query, acc), key_t, value_acc, _to(target, acc), scale,
                                                      store_residual)
    else:
        parts = [_forward_rows(_to(query[:, rows], acc), key_t, value_acc, _to(target[:, rows], acc), scale,
                               store_residual) for rows in chunks]
        losses = torch.stack([p[0] for p in parts]).sum(0)
        lse, rowdot, residual = (torch.cat([p[i] for p in parts], 1) if store_residual or i == 1 else None
                                 for i in (1, 2, 3))
    if not store_residual:
        return losses, lse, lse.new_empty(0), query.new_empty(0)
    return losses, lse, rowdot, _to(residual, query.dtype)


def tat_forward_with_grad(query, key, value, target, scale: float, keep_residual: bool):
    """Forward and gradients in one pass: per batch item losses sum E^2 (B,), and for dL_b/dO = E (a unit weight
    per item) dq = s dS K, dk = s dS^T Q, dv = P^T E with dS = P (E V^T - rowdot), all in the accumulation dtype;
    the residual E (else None) when `keep_residual` (for the target's gradient)."""
    B, N, _ = query.shape
    acc = acc_dtype(query.dtype)
    q, k, v, t = (_to(x, acc) for x in (query, key, value, target))
    key_t, value_t = k.transpose(1, 2), v.transpose(1, 2)
    chunks = _query_chunks(B, N, key.shape[1])
    parts = []
    for rows in chunks:
        q_rows, t_rows = (q, t) if len(chunks) == 1 else (q[:, rows], t[:, rows])
        p = torch.softmax(_logits(q_rows, key_t, scale), -1)
        err = torch.baddbmm(t_rows, p, v, beta=-1)  # O - t
        ds = torch._softmax_backward_data(torch.bmm(err, value_t), p, -1, acc)  # P (E V^T - rowdot)
        if scale != 1.0:
            ds.mul_(scale)
        parts.append((torch.linalg.vecdot(err, err).sum(-1), torch.bmm(ds, k),  # as _forward_rows: same bits
                      torch.bmm(ds.transpose(1, 2), q_rows), torch.bmm(p.transpose(1, 2), err),
                      err if keep_residual else None))
    if len(parts) == 1:
        return parts[0]
    losses, dk, dv = (torch.stack([part[i] for part in parts]).sum(0) for i in (0, 2, 3))  # fixed order
    dq = torch.cat([part[1] for part in parts], 1)
    return losses, dq, dk, dv, (torch.cat([part[4] for part in parts], 1) if keep_residual else None)


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
    key_acc = _to(key, acc)
    key_t, value_t = key_acc.transpose(1, 2), _to(value, acc).transpose(1, 2)
    chunks = _query_chunks(B, N, key.shape[1])
    if len(chunks) == 1:
        dq, dk, dv = _backward_rows(_to(query, acc), _to(residual, acc) * weight[:, None, None], lse,
                                    rowdot * weight[:, None], key_acc, key_t, value_t, scale)
    else:
        parts = [_backward_rows(_to(query[:, rows], acc), _to(residual[:, rows], acc) * weight[:, None, None], lse[:, rows],
                                rowdot[:, rows] * weight[:, None], key_acc, key_t, value_t, scale) for rows in chunks]
        dq = torch.cat([p[0] for p in parts], 1)
        dk, dv = (torch.stack([p[i] for p in parts]).sum(0) for i in (1, 2))  # fixed order
    return _to(dq, query.dtype), _to(dk, key.dtype), _to(dv, value.dtype)
