"""Ahead-of-time compile check of every Triton kernel for sm_90 and sm_80 (benchmarks/aot.py), no GPU needed.

The quick subset runs here (every kernel in fp32, training launches at one shape each: 14 specialisations, 28 compiles); the
full sweep (every benchmark shape, fp32/fp16/bf16, every layout, every autotuning candidate) runs with
FASTKD_AOT_FULL=1 and writes benchmarks/results/aot-triton<version>.{json,md}. Compilation needs the Triton
compiler, hence a subprocess with the interpreter off; skipped only where ptxas is missing.
"""
import ast
import glob
import json
import os
import shutil
import subprocess
import sys

import pytest
import triton

from benchmarks.aot import ARCH_LIMITS, occupancy, problems

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ptxas():
    """Triton's own ptxas (shipped in its wheel) or the one TRITON_PTXAS_PATH / PATH names; None if none."""
    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    for path in (os.environ.get("TRITON_PTXAS_PATH"), bundled, shutil.which("ptxas")):
        if path and os.access(path, os.X_OK):
            return path
    return None


def _kernel_names():
    """Every @triton.jit function named *_kernel in fastkd/kernels/*_triton.py (read from the source)."""
    names = set()
    for path in glob.glob(os.path.join(ROOT, "fastkd", "kernels", "*_triton.py")):
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.FunctionDef) and node.name.endswith("_kernel"):
                names.add(node.name)
    return names


def _run_aot(out_dir, *args):
    if _ptxas() is None:
        pytest.skip("no ptxas (neither Triton's bundled one nor TRITON_PTXAS_PATH nor PATH): cannot compile")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, "-m", "benchmarks.aot", "--out-dir", str(out_dir), *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=1800)
    reports = glob.glob(os.path.join(out_dir, "aot-*.json"))
    assert reports, f"no report written:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    report = json.load(open(reports[0]))
    return done, report


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    return _run_aot(tmp_path_factory.mktemp("aot"))


def _assert_clean(done, report):
    failing = [f"{r['kernel']} sm_{r['arch']} {r['cases'][:2]}: {'; '.join(r['problems'])}" for r in report["rows"]
               if r["problems"]]
    assert not failing, "\n".join(failing)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def test_quick_sweep_compiles_without_spills_within_shared_memory(quick):
    _assert_clean(*quick)


def test_quick_sweep_compiles_each_distinct_specialisation_once_and_measures_it(quick):
    _, report = quick
    # by Triton's own cache key: no two specialisations would give the same binary
    assert report["distinct_compiles"] == report["specialisations"]
    assert report["compiled"] == report["specialisations"] * len(report["archs"]) == len(report["rows"])
    assert all(r["cpu_s"] > 0 for r in report["rows"] if not r.get("error"))
    assert report["cpu_seconds"] > 0 and report["jobs"] >= 1


def test_quick_sweep_covers_every_kernel_on_both_architectures(quick):
    _, report = quick
    compiled = {(r["kernel"], r["arch"]) for r in report["rows"]}
    missing = {(k, a) for k in _kernel_names() for a in (90, 80)} - compiled
    assert not missing, f"kernels never compiled: {sorted(missing)}"


@pytest.mark.skipif(os.environ.get("FASTKD_AOT_FULL") != "1", reason="full sweep (minutes): set FASTKD_AOT_FULL=1")
def test_full_sweep():
    _assert_clean(*_run_aot(os.path.join(ROOT, "benchmarks", "results"), "--full"))


def test_occupancy_estimate():
    # 255 registers -> 256 per thread, 8 warps: 64K / (256 * 32 * 8) = 1 block of 8 warps
    assert occupancy(255, 0, 8, 90) == dict(warps_per_sm=8, occupancy=0.125, limited_by="registers")
    # 32 registers, 4 warps, 16 KB: registers allow 16 blocks, threads 16, shared memory 228 / 16 = 14 (sm_90)
    assert occupancy(32, 16 * 1024, 4, 90) == dict(warps_per_sm=56, occupancy=56 / 64, limited_by="shared")
    assert occupancy(32, 16 * 1024, 4, 80)["warps_per_sm"] == 40  # 164 / 16 = 10 blocks on sm_80


def test_problems_flag_spills_stack_and_shared_memory():
    row = dict(arch=80, spill_stores=0, spill_loads=0, stack=0, shared=ARCH_LIMITS[80]["smem_per_block"])
    assert problems(row) == []
    assert problems(dict(row, spill_stores=8, spill_loads=4, stack=8)) == ["spills 8 B stored, 4 B loaded",
                                                                           "stack frame 8 B"]
    assert problems(dict(row, shared=row["shared"] + 1))[0].startswith("shared memory")
    assert problems(dict(row, error="PTXASError: boom\nmore")) == ["PTXASError: boom"]
