"""Benchmark plumbing: device names, peak memory, timing through pytest-benchmark, result records."""
import datetime
import json
import os
import platform
import re
import subprocess

import torch


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        match = re.search(r"model name\s*:\s*(.+)", open("/proc/cpuinfo").read())
        model = match.group(1).strip() if match else model
    return f"{model} ({torch.get_num_threads()} threads)"


def git_commit() -> str:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=root, text=True).strip()
        dirty = subprocess.check_output(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, text=True)
        return commit + ("-dirty" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment(device: torch.device) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"device": device_name(device), "device_type": device.type, "torch": torch.__version__,
            "triton": triton_version, "cuda": torch.version.cuda, "python": platform.python_version(),
            "commit": git_commit(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_bytes(fn, device: torch.device) -> int:
    """Peak bytes allocated by one call of fn above what was allocated before it."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        fn()
    current = peak = 0
    for _, action, _, size in prof._memory_profile().timeline:  # CPU memory timeline of the call
        if action.name == "CREATE":
            current += size
        elif action.name == "DESTROY":
            current -= size
        peak = max(peak, current)
    return peak


def run_benchmark(benchmark, fn, device: torch.device, warmup: int = 3):
    """Warm fn up (compilation, autotuning, caches), time it with pytest-benchmark; (median, minimum) seconds or
    None."""
    def call():
        fn()
        synchronize(device)

    for _ in range(warmup):
        call()
    benchmark(call)
    stats = getattr(benchmark, "stats", None)
    return (stats.stats.median, stats.stats.min) if stats else None


def write_results(path: str, env: dict, records: list) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"environment": env, "results": records}, f, indent=1)
        f.write("\n")


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def measure(benchmark, record, op: str, step, check, device: torch.device, group: str,
            min_bytes_moved: int = None, **fields) -> None:
    """One benchmark case: run `step` once and `check` its result (so the timing is of the right thing), time
    it, and record median and minimum time and peak memory (and GB/s when the fewest bytes any implementation must
    move are given) for benchmarks/results/<op>-<device>.json. Running out of memory is recorded as the result
    and the case skipped (dense baselines at stress shapes). Smoke runs time and record nothing."""
    import pytest
    try:
        result = step()
    except torch.OutOfMemoryError:
        record(op, status="out of memory", **fields)
        torch.cuda.empty_cache()
        pytest.skip(f"{fields.get('impl')} ran out of memory at {fields.get('shape')}")
    check(result)
    benchmark.group = group
    timing = run_benchmark(benchmark, step, device)
    if timing is None:
        return
    seconds, fastest = timing
    if min_bytes_moved is not None:
        fields.update(min_bytes_moved=min_bytes_moved, gb_per_s=min_bytes_moved / seconds / 1e9)
    record(op, median_ms=seconds * 1e3, min_ms=fastest * 1e3, peak_memory_bytes=peak_memory_bytes(step, device),
           **fields)
