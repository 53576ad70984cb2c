"""Input validation shared by the public ops: errors name the argument, what was expected and what came."""
import numbers

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INF = float("inf")


def check_float_tensor(name: str, x, min_dim: int = 0) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor (float16, bfloat16, float32 or float64), "
                        f"got dtype {x.dtype}")
    if x.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dimension(s), got shape {tuple(x.shape)}")


def check_same_shape(name: str, x, ref_name: str, ref) -> None:
    if x.shape != ref.shape:
        raise ValueError(f"{name} must have the shape of {ref_name} {tuple(ref.shape)}, got {tuple(x.shape)}")


def check_same_device(name: str, x, ref_name: str, ref) -> None:
    if x.device != ref.device:
        raise ValueError(f"{name} must be on the device of {ref_name} ({ref.device}), got {x.device}")


def check_same_device_and_dtype(name: str, x, ref_name: str, ref) -> None:
    check_same_device(name, x, ref_name, ref)
    if x.dtype != ref.dtype:
        raise TypeError(f"{name} must have the dtype of {ref_name} ({ref.dtype}), got {x.dtype}")


def check_int_tensor(name: str, x, shape) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got dtype {x.dtype}")
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(x.shape)}")


def _is_int(value) -> bool:
    return isinstance(value, (numbers.Integral, torch.SymInt)) and not isinstance(value, bool)


def check_int_sequence(name: str, value, length: int, min_value: int = 0) -> tuple:
    """`length` integers >= min_value (ints, or SymInts under torch.compile), returned as a tuple."""
    if (not isinstance(value, (tuple, list, torch.Size)) or len(value) != length or not all(map(_is_int, value))
            or not all(v >= min_value for v in value)):
        raise ValueError(f"{name} must be {length} integers >= {min_value}, got {value!r}")
    return tuple(value)


def check_positive_number(name: str, value) -> float:
    if type(value) is float and 0 < value < _INF:  # the common case, without the slower ABC check below
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not value > 0 or value == float("inf"):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return float(value)


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_binary_mask(name: str, mask, shape) -> torch.Tensor:
    """A (shape) tensor of 0/1 values (bool, integer or float) as bool. Non-bool values are checked without a
    host sync: on CPU tensors at once, on CUDA ones by a device-side assert (torch._assert_async); not while
    torch.compile traces."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(mask.shape)}")
    if mask.dtype == torch.bool:
        return mask
    if mask.is_complex():
        raise TypeError(f"{name} must hold 0/1 values as bool, integer or float, got dtype {mask.dtype}")
    if not torch.compiler.is_compiling():
        message = f"{name} must hold only 0 and 1, got other values (dtype {mask.dtype})"
        binary = ((mask == 0) | (mask == 1)).all()
        if mask.is_cuda:
            torch._assert_async(binary, message)
        elif not binary:
            raise ValueError(message)
    return mask != 0
