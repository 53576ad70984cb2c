"""Shared Triton helpers: interpreter detection, compute dtypes, grid sizing and stable math."""
import functools
import os

import torch
import triton
import triton.language as tl


def _interpreted() -> bool:
    """Whether @triton.jit makes interpreted kernels: triton.knobs (Triton >= 3.4, torch >= 2.8) when present, else
    the TRITON_INTERPRET variable that older Triton reads."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


# Triton picks interpreter or compiler when a kernel is decorated, i.e. when this module is imported.
INTERPRETED = _interpreted()


def compute_dtype(dtype: torch.dtype):
    """Accumulation dtype inside kernels: float64 stays float64, everything else accumulates in float32."""
    return tl.float64 if dtype == torch.float64 else tl.float32


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def max_programs(device: torch.device) -> int:
    """Programs for a persistent reduction grid: 4 per SM on a GPU, a few under the interpreter."""
    if device.type == "cuda":
        return 4 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 8


@triton.jit
def log1p_unit(e):
    """log(1 + e) for e in [0, 1], accurate for tiny e (Goldberg's trick; no log1p in every backend)."""
    u = 1.0 + e
    exact = u == 1.0
    return tl.where(exact, e, tl.log(u) * (e / tl.where(exact, 1.0, u - 1.0)))


@triton.jit
def sigmoid_pair(x):
    """(sigmoid(x), sigmoid(-x)) without overflow and without 1 - sigmoid cancellation."""
    e = tl.exp(-tl.abs(x))
    r = 1.0 / (1.0 + e)
    pos = x >= 0
    return tl.where(pos, r, e * r), tl.where(pos, e * r, r)


@triton.jit
def softplus_neg_abs(x):
    """log(1 + exp(-|x|)), in [0, log 2]: log sigmoid(x) = min(x, 0) - softplus_neg_abs(x)."""
    return log1p_unit(tl.exp(-tl.abs(x)))


def autotune(configs, key, prune=None, reset_to_zero=None):
    """``triton.autotune`` over `configs` (``triton.Config`` lists of warps and stages; the block sizes, which size
    the grid, stay launch arguments chosen on the host). `key` must name only sizes fixed for a whole training run
    (channel widths, token counts; never batch or group sizes), so steady-state training never retunes; tensor
    dtypes are part of Triton's key anyway. `prune(configs, launch arguments) -> configs` drops candidates that do not
    fit the launch's tiles. Under the interpreter the first candidate alone (nothing to time). The AOT check
    (benchmarks/aot.py) compiles every candidate that survives pruning: none may spill."""
    if INTERPRETED:
        return triton.autotune(configs=configs[:1], key=key)

    def early_prune(candidates, named_args, **kwargs):
        return prune(candidates, {**named_args, **kwargs})

    return triton.autotune(configs=configs, key=key, reset_to_zero=reset_to_zero,
                           prune_configs_by={"early_config_prune": early_prune} if prune is not None else None)
