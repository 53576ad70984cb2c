"""Test setup: without a GPU, Triton kernels run on CPU tensors under the Triton interpreter.

TRITON_INTERPRET must be set before triton is first imported, hence at the top of this file.
"""
import functools
import os
import socket

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fastkd.ops.registry import triton_on_cpu  # noqa: E402  (after TRITON_INTERPRET)

# Kernel path x device: "cpu" runs the CPU kernels (C++ or vectorised PyTorch), "triton-cpu" the GPU kernels
# under the interpreter (CPU machines only), "triton-cuda" the compiled GPU kernels. Cases that cannot run here
# are skipped, so they still show up.
BACKENDS = {"cpu": "cpu", "triton-cpu": "cpu", "triton-cuda": "cuda"}


@functools.lru_cache(maxsize=None)
def interpreter_problem():
    """None if the Triton interpreter runs a loop over a run-time bound, else why not. Triton 3.6's interpreter
    fails with numpy >= 2.4 (int() of a 1-element array inside `range`; Triton 3.8 is fine): then install
    numpy < 2.4 to run the interpreted tests (requirements.txt pins the versions CI tests, which work)."""
    import numpy
    import triton
    import triton.language as tl

    @triton.jit
    def count(out_ptr, n):
        total = 0
        for _ in range(n):
            total += 1
        tl.store(out_ptr, total)

    out = torch.zeros(1, dtype=torch.int32)
    try:
        count[(1,)](out, 3)
    except Exception as error:  # noqa: BLE001 (the reason is reported)
        return (f"Triton {triton.__version__}'s interpreter fails with numpy {numpy.__version__} "
                f"({type(error).__name__}: {str(error)[:120]}); use numpy < 2.4 or Triton >= 3.8")
    return None if out.item() == 3 else f"Triton {triton.__version__}'s interpreter counted {out.item()} != 3"


@pytest.fixture(params=list(BACKENDS))
def device(request):
    """Device to test on; for "triton-cpu", CPU tensors take the Triton kernels while the test runs."""
    if request.param == "triton-cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if request.param == "triton-cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("the Triton interpreter is off (a GPU is present)")
        if interpreter_problem():
            pytest.skip(interpreter_problem())
        triton_on_cpu(True)
        request.addfinalizer(lambda: triton_on_cpu(False))
    return torch.device(BACKENDS[request.param])


# Tolerances per dtype for a loss or gradient against a float64 reference on the same inputs:
# fp32 accumulation everywhere, so low-precision errors come from rounding the output itself. fp32's atol
# is a few ulps of the inputs' magnitude (|z| ~ 16: ulp 1e-6): small results computed from such values
# (a KL of nearby distributions cancels to first order) carry that absolute error whatever the formula.
TOLERANCES = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=5e-6),
    torch.float16: dict(rtol=2e-3, atol=1e-4),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-3),
}


@pytest.fixture(params=[torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def dtype(request, device):
    """Floating dtypes; the Triton interpreter has no bf16, so Triton's bf16 is tested on CUDA only."""
    if request.param == torch.bfloat16 and request.node.callspec.params.get("device") == "triton-cpu":
        pytest.skip("the Triton interpreter has no bf16: Triton bf16 is tested on CUDA")
    return request.param


def assert_close(actual, expected, dtype=None):
    """Compare to a (float64) reference with the tolerance of `dtype` (default: actual's dtype)."""
    tol = TOLERANCES[dtype or actual.dtype]
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), equal_nan=True, **tol)


# Relative-norm tolerances |actual - expected| / |expected| for ops whose elements mix large and tiny
# values (sums over many pairs with cancellation): elementwise rtol would judge noise in tiny elements.
# fp16 is loose because small gradients land in its subnormal range.
NORM_TOLERANCES = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 3e-2}


def assert_close_norm(actual, expected, dtype=None):
    """Same shape, NaN where expected is NaN, and relative Frobenius error within the dtype's tolerance."""
    tol = NORM_TOLERANCES[dtype or actual.dtype]
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.equal(actual.isnan(), expected.isnan()), "NaN positions differ"
    actual, expected = actual.nan_to_num(), expected.nan_to_num()
    error = (actual - expected).norm().item()
    scale = expected.norm().item()
    assert error <= tol * max(scale, 1e-12), f"relative error {error / max(scale, 1e-30):.3g} > {tol:g}"


def free_port() -> int:
    """A TCP port free on localhost now, for a test's process group."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun_environment(rank: int, world: int, port: int) -> None:
    """The variables torchrun sets, so that a spawned test process joins the group as torchrun's would."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))


def without_seconds(histories):
    """{name: per-epoch records} with the wall-clock field zeroed, for comparing two runs."""
    return {name: [{**record, "seconds": 0} for record in history] for name, history in histories.items()}


def ranks_that_agree(out_dir, world: int = 2) -> list:
    """The rank{r}.pt files of DDP workers ({"params": [...], "histories": {...}, ...}), after checking that every
    rank ended with identical parameters and histories."""
    ranks = [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=True) for r in range(world)]
    for other in ranks[1:]:
        for a, b in zip(ranks[0]["params"], other["params"]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert without_seconds(ranks[0]["histories"]) == without_seconds(other["histories"])
    return ranks


def killed_make_step(make_step, killed_method: str, epoch: int):
    """A recipe's make_step(method, ...) whose steps of `killed_method` raise KeyboardInterrupt in `epoch`
    (0-based): a run killed there, for the resume tests."""
    def make(method, *args, **kwargs):
        step = make_step(method, *args, **kwargs)

        def killable(model, batch, current_epoch):
            if method == killed_method and current_epoch == epoch:
                raise KeyboardInterrupt("killed")
            return step(model, batch, current_epoch)
        return killable
    return make


class RunsACommand:
    """Unpickling this runs `touch marker`: what a crafted checkpoint would do, and what loading must refuse."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def assert_cuda_graph_replays(step):
    """step() -> tensors, captured in a CUDA graph and replayed, gives what an eager call gives. Capture fails on
    any host sync, so this also shows that step has none."""
    expected = step()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up on a side stream (Triton compilation, allocator pools)
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    for got, want in zip(captured, expected):
        torch.testing.assert_close(got, want)
