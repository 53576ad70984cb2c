"""Checkpoint files: atomic saves, trusted loads (tensors and plain containers only) and the out-dir lock."""
import contextlib
import fcntl
import os
import tempfile

import torch


class CheckpointError(RuntimeError):
    """A checkpoint or weight file that cannot be used, reported as one line naming the file."""


def save_atomically(state: dict, path: str) -> None:
    """torch.save to a temporary file of this process's own, then rename over `path`: a killed run never leaves
    a half-written checkpoint, and two writers never share a temporary file."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(descriptor, "wb") as f:
            torch.save(state, f)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)
        raise


def load_trusted(path: str, map_location=None, hint: str = "") -> dict:
    """torch.load with weights_only=True: tensors and plain containers load, anything that could run code on
    unpickling is refused. Missing, empty, truncated or corrupt files raise CheckpointError naming the file
    (and `hint`: what the user can do instead). torch files carry no checksum: a flipped byte inside tensor
    data loads as a wrong value; one in the archive's structure or the pickle is reported."""
    suffix = f" ({hint})" if hint else ""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file{suffix}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:
        if "weights only load failed" in str(error).lower():
            raise CheckpointError(
                f"{path} holds Python objects beyond tensors and plain containers; fastkd refuses to unpickle "
                f"them, since that can run arbitrary code. Re-save only its state_dict{suffix}") from None
        detail = str(error).strip().splitlines()[0] if str(error).strip() else ""
        reason = type(error).__name__ + (f": {detail}" if detail else "")
        raise CheckpointError(f"{path} is not a readable checkpoint (empty, truncated or corrupt: {reason})"
                              f"{suffix}") from None


@contextlib.contextmanager
def exclusive(directory: str):
    """Hold directory/.lock for the duration: a second run on the same directory fails at once, naming the
    holder's process id, instead of interleaving its checkpoints with ours."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, ".lock")
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            raise CheckpointError(f"{directory} is in use by another fastkd run (process {holder}); wait for it "
                                  f"or choose another --out-dir") from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
