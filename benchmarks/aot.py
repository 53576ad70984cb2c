"""Ahead-of-time compile check of every Triton kernel launch the ops make, for sm_90 and sm_80, without a GPU.

    python -m benchmarks.aot [--full] [--arch 90 80] [--out-dir benchmarks/results]

1. Capture: the kernel functions the ops call (``fastkd.kernels.<op>_triton``) run on meta tensors at the benchmark
   shapes (shared/design/benchmark-shapes.md), fp32/fp16/bf16, in every input layout the public ops produce;
   ``JITFunction.run`` is replaced so that each launch is recorded instead of run (an autotuned launch records
   every configuration that survives pruning: each one must fit).
2. Specialise each launch as Triton does at launch time (pointer and integer arguments divisible by 16, integers
   equal to 1 as constants), de-duplicate, and compile it with Triton's real compiler for
   ``GPUTarget("cuda", arch, 32)``: TTIR -> TTGIR -> LLVM -> PTX -> ptxas, whose ``-v`` report gives registers,
   spill bytes and stack frame; Triton's metadata gives the shared memory it allocates.
3. Estimate occupancy (resident warps per SM from registers, shared memory and threads), check: no compile
   failure, no spill, no stack frame, shared memory within the architecture's per-block limit; write
   ``aot-triton<version>.json`` and ``.md`` under --out-dir. Exit status 1 when any check fails.

The default sweep is a quick subset (one case per kernel and dtype class, seconds per compile); --full compiles
every shape, dtype and layout (minutes). Needs no GPU, only ptxas (shipped with Triton); must run with the
interpreter off (TRITON_INTERPRET unset), which is why the tests run it in a subprocess.
"""
import argparse
import contextlib
import io
import json
import os
import re
import resource
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, List

if __name__ == "__main__":  # before triton is imported:
    # a private cache (a cached kernel skips ptxas, whose report is what this module reads), and the compiler
    os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="fastkd-aot-cache-"))
    os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

# Per-SM and per-block limits: registers 64K per SM on both; threads 2048 per SM; 32 resident blocks.
ARCH_LIMITS = {
    90: dict(smem_per_block=227 * 1024, smem_per_sm=228 * 1024),
    80: dict(smem_per_block=163 * 1024, smem_per_sm=164 * 1024),
}
REGISTERS_PER_SM = 65536
MAX_WARPS_PER_SM = 64
MAX_BLOCKS_PER_SM = 32
TYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
              torch.int32: "i32", torch.int64: "i64", torch.int8: "i8", torch.uint8: "u8", torch.bool: "i1"}


@dataclass
class Launch:
    kernel: JITFunction
    args: dict  # parameter name -> value, constexprs included
    num_warps: int
    num_stages: int


@dataclass
class Case:
    """One call of a kernel-module function as an op makes it; `run` performs it on meta tensors."""
    op: str
    dtype: torch.dtype
    layout: str
    shape: str
    run: Callable[[], None]
    quick: bool = False


@dataclass
class Specialisation:
    name: str
    kernel: JITFunction = field(repr=False)
    signature: dict
    constexprs: dict
    attrs: dict
    num_warps: int
    num_stages: int
    cases: List[str] = field(default_factory=list)

    def key(self):
        return (self.name, tuple(self.signature.items()), tuple(sorted(map(str, self.constexprs.items()))),
                tuple(sorted(self.attrs)), self.num_warps, self.num_stages)


@contextlib.contextmanager
def capture():
    """Within the block, Triton kernel launches are recorded in the yielded list instead of being run."""
    launches = []
    run, tuned_run = JITFunction.run, Autotuner.run

    def record(self, *args, grid=None, warmup=False, **kwargs):
        names = [p.name for p in self.params]
        bound = dict(zip(names, args), **{k: v for k, v in kwargs.items() if k in names})
        for p in self.params:  # defaults of parameters not passed
            if p.name not in bound and p.has_default:
                bound[p.name] = p.default
        launches.append(Launch(self, bound, kwargs.get("num_warps", 4), kwargs.get("num_stages", 3)))

    def record_tuned(self, *args, **kwargs):
        self.nargs = dict(zip(self.arg_names, args))
        configs = self.prune_configs(kwargs) if len(self.configs) > 1 else self.configs
        for config in configs:
            record(self.fn, *args, **kwargs, **config.all_kwargs())
        self.nargs = None

    JITFunction.run, Autotuner.run = record, record_tuned
    try:
        yield launches
    finally:
        JITFunction.run, Autotuner.run = run, tuned_run


def specialise(launch: Launch) -> Specialisation:
    """Signature, constants and divisibility attributes as Triton's launcher derives them from the arguments
    (tensors are assumed 16-byte aligned, as torch allocates them)."""
    signature, constexprs, attrs = {}, {}, {}
    kernel = launch.kernel
    for index, param in enumerate(kernel.params):
        value = launch.args[param.name]
        if param.is_constexpr:
            signature[param.name] = "constexpr"
            constexprs[(index,)] = value
        elif isinstance(value, torch.Tensor):
            signature[param.name] = "*" + TYPE_NAMES[value.dtype]
            if not param.do_not_specialize_on_alignment:
                attrs[(index,)] = [["tt.divisibility", 16]]
        elif isinstance(value, bool):
            signature[param.name] = "i1"
        elif isinstance(value, int):
            if value == 1 and not param.do_not_specialize:
                signature[param.name] = "constexpr"
                constexprs[(index,)] = 1
                continue
            signature[param.name] = "i32" if -2**31 <= value < 2**31 else "i64"
            if value % 16 == 0 and not param.do_not_specialize:
                attrs[(index,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[param.name] = "fp32"
        elif value is None:
            signature[param.name] = "constexpr"
            constexprs[(index,)] = None
        else:
            raise TypeError(f"{kernel.__name__}: argument {param.name} of type {type(value).__name__} not handled")
    return Specialisation(kernel.__name__, kernel, signature, constexprs, attrs, launch.num_warps, launch.num_stages)


PTXAS = dict(registers=r"Used (\d+) registers", spill_stores=r"(\d+) bytes spill stores",
             spill_loads=r"(\d+) bytes spill loads", stack=r"(\d+) bytes stack frame")


def occupancy(registers: int, shared: int, num_warps: int, arch: int) -> dict:
    """Resident warps per SM (of 64) and what limits them: registers (allocated per warp in units of 256),
    shared memory, threads, or the block limit."""
    per_warp = -(-registers * 32 // 256) * 256
    limits = {
        "registers": REGISTERS_PER_SM // (per_warp * num_warps) if per_warp else MAX_BLOCKS_PER_SM,
        "shared": ARCH_LIMITS[arch]["smem_per_sm"] // shared if shared else MAX_BLOCKS_PER_SM,
        "threads": MAX_WARPS_PER_SM // num_warps,
        "blocks": MAX_BLOCKS_PER_SM,
    }
    limiter = min(limits, key=limits.get)
    warps = limits[limiter] * num_warps
    return dict(warps_per_sm=warps, occupancy=warps / MAX_WARPS_PER_SM, limited_by=limiter)


def compile_one(spec: Specialisation, arch: int) -> dict:
    """Compile for sm_<arch>; the row of the table (error set when compilation failed)."""
    row = dict(kernel=spec.name, arch=arch, num_warps=spec.num_warps, num_stages=spec.num_stages,
               constexprs={spec.kernel.params[i[0]].name: str(v) for i, v in spec.constexprs.items()
                           if spec.kernel.params[i[0]].is_constexpr},
               cases=spec.cases)
    source = ASTSource(spec.kernel, spec.signature, spec.constexprs, spec.attrs)
    log = io.StringIO()
    started, cpu_started = time.perf_counter(), _cpu_seconds()
    try:
        with _ptxas_log(), contextlib.redirect_stdout(log):
            compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                                      options=dict(num_warps=spec.num_warps, num_stages=spec.num_stages))
    except Exception as error:  # noqa: BLE001 (any compiler failure is a finding to report)
        row.update(error=f"{type(error).__name__}: {str(error)[:2000]}")
        return row
    row["compile_s"] = round(time.perf_counter() - started, 2)
    row["cpu_s"] = round(_cpu_seconds() - cpu_started, 2)
    report = log.getvalue()
    for name, pattern in PTXAS.items():
        found = re.findall(pattern, report)
        row[name] = max(map(int, found)) if found else None
    if row["registers"] is None:
        row.update(error="no ptxas report (kernel taken from a cache?)")
        return row
    row["shared"] = int(compiled.metadata.shared)
    row.update(occupancy(row["registers"], row["shared"], spec.num_warps, arch))
    return row


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (ptxas): what a compile costs whatever the load."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def default_jobs() -> int:
    """The CPUs this process may run on (each compile is single-threaded and CPU-bound)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def distinct_compiles(specs: List[Specialisation]) -> int:
    """How many different binaries per architecture the specialisations make, by Triton's own cache key (source,
    signature, constants, attributes) and the launch options: equal to len(specs) when none is compiled twice."""
    return len({(ASTSource(s.kernel, s.signature, s.constexprs, s.attrs).hash(), s.num_warps, s.num_stages)
                for s in specs})


@contextlib.contextmanager
def _ptxas_log():
    knobs = triton.knobs.nvidia
    saved = knobs.dump_ptxas_log
    knobs.dump_ptxas_log = True
    try:
        yield
    finally:
        knobs.dump_ptxas_log = saved


_TASKS = []  # (specialisation, arch), inherited by forked compiler processes


def _compile_task(index: int) -> dict:
    return compile_one(*_TASKS[index])


def compile_all(specs: List[Specialisation], archs: List[int], jobs: int):
    """Rows in order, compiled by `jobs` forked processes (each compile runs ptxas: CPU-bound); every (specialisation,
    architecture) pair is one task, so both architectures compile in parallel."""
    _TASKS[:] = [(spec, arch) for spec in specs for arch in archs]
    # Triton's key of its own sources (it hashes every file of the package) once here, not once per forked process
    from triton.runtime.cache import triton_key
    triton_key()
    if jobs <= 1:
        yield from map(_compile_task, range(len(_TASKS)))
        return
    import multiprocessing
    with multiprocessing.get_context("fork").Pool(jobs) as pool:
        yield from pool.imap(_compile_task, range(len(_TASKS)))


def problems(row: dict) -> List[str]:
    if row.get("error"):
        return [row["error"].splitlines()[0]]
    found = []
    if row["spill_stores"] or row["spill_loads"]:
        found.append(f"spills {row['spill_stores']} B stored, {row['spill_loads']} B loaded")
    if row["stack"]:
        found.append(f"stack frame {row['stack']} B")
    if row["shared"] > ARCH_LIMITS[row["arch"]]["smem_per_block"]:
        found.append(f"shared memory {row['shared']} B > {ARCH_LIMITS[row['arch']]['smem_per_block']} B")
    return found


def specialisations(cases: List[Case]) -> List[Specialisation]:
    """The distinct specialisations the cases launch, each listing the cases that launch it."""
    found = {}
    for case in cases:
        with capture() as launches:
            case.run()
        if not launches:
            raise RuntimeError(f"case {case.op} {case.shape} launched no kernel")
        for launch in launches:
            spec = specialise(launch)
            spec = found.setdefault(spec.key(), spec)
            label = f"{case.op} {case.shape} {TYPE_NAMES[case.dtype]} {case.layout}"
            if label not in spec.cases:
                spec.cases.append(label)
    return list(found.values())


def markdown(rows: List[dict], header: str) -> str:
    lines = [header, "",
             "| kernel | arch | cases (op shape dtype layout) | warps | stages | registers | spills (B) | stack (B) "
             "| shared (B) | warps/SM (occupancy, limit) | compile (s wall, CPU) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        cases = "; ".join(row["cases"][:3]) + (f"; +{len(row['cases']) - 3}" if len(row["cases"]) > 3 else "")
        if row.get("error"):
            lines.append(f"| {row['kernel']} | sm_{row['arch']} | {cases} | {row['num_warps']} | "
                         f"{row['num_stages']} | FAILED: {row['error'].splitlines()[0][:120]} | | | | | |")
            continue
        lines.append(
            f"| {row['kernel']} | sm_{row['arch']} | {cases} | {row['num_warps']} | {row['num_stages']} | "
            f"{row['registers']} | {row['spill_stores']}/{row['spill_loads']} | {row['stack']} | {row['shared']} | "
            f"{row['warps_per_sm']} ({row['occupancy']:.0%}, {row['limited_by']}) | {row['compile_s']}"
            f"{', ' + str(row['cpu_s']) if 'cpu_s' in row else ''} |")
    return "\n".join(lines) + "\n"


def timing(meta: dict) -> str:
    """The sweep's cost in words: wall time, processes, CPU time (load-independent) and the load it ran under."""
    if "cpu_seconds" not in meta:  # reports written before CPU time was measured
        return f"{meta['seconds']} s of compilation"
    return (f"compiled in {meta['seconds']} s wall by {meta['jobs']} processes, {meta['cpu_seconds']} s of CPU "
            f"(1-minute load average {meta['load_average'][0]} at the start, {meta['load_average'][1]} at the end; "
            f"capture {meta['capture_seconds']} s)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="every shape, dtype and layout (minutes)")
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80], choices=sorted(ARCH_LIMITS))
    parser.add_argument("--out-dir", default=os.path.join(os.path.dirname(__file__), "results"))
    parser.add_argument("--only", default="", help="compile only kernels whose name contains one of these (comma-separated)")
    parser.add_argument("--merge", action="store_true", help="replace only the compiled kernels' rows of an "
                        "existing report of the same Triton version and sweep (a re-check after a change)")
    parser.add_argument("--jobs", type=int, default=default_jobs(), help="compiler processes (default: the CPUs)")
    parser.add_argument("--match", default="", help="compile only specialisations one of whose cases (op shape "
                        "dtype layout) contains this")
    args = parser.parse_args(argv)

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("run with the Triton interpreter off (TRITON_INTERPRET unset): it compiles nothing")
    from benchmarks.aot_cases import all_cases
    load_before, captured = os.getloadavg(), time.perf_counter()
    cases = [c for c in all_cases() if args.full or c.quick]
    only = args.only.split(",")
    specs = [s for s in specialisations(cases)
             if any(o in s.name for o in only) and any(args.match in c for c in s.cases)]
    distinct = distinct_compiles(specs)
    sweep = "full" if args.full else "quick"
    print(f"triton {triton.__version__}: {len(cases)} cases, {len(specs)} specialisations ({distinct} distinct "
          f"compiles), archs {args.arch} ({sweep}), {args.jobs} compiler processes", flush=True)
    rows, failed, started = [], [], time.perf_counter()
    capture_s = started - captured
    for row in compile_all(specs, args.arch, args.jobs):
        row["problems"] = problems(row)
        rows.append(row)
        status = "; ".join(row["problems"]) or "ok"
        print(f"  {row['kernel']} sm_{row['arch']} w{row['num_warps']} s{row['num_stages']} "
              f"{ {k: v for k, v in row['constexprs'].items() if k.startswith(('BLOCK', 'ONE', 'PREC'))} } "
              f"regs {row.get('registers')} shared {row.get('shared')} cpu {row.get('cpu_s')} s: {status}", flush=True)
        if row["problems"]:
            failed.append(row)
    elapsed = time.perf_counter() - started
    os.makedirs(args.out_dir, exist_ok=True)
    stem = os.path.join(args.out_dir, f"aot-triton{triton.__version__}" + ("" if args.full else "-quick"))
    command = " ".join(["python -m benchmarks.aot"] + (argv if argv is not None else sys.argv[1:]))
    meta = dict(triton=triton.__version__, torch=torch.__version__, sweep=sweep, archs=args.arch, cases=len(cases),
                specialisations=len(specs), distinct_compiles=distinct, compiled=len(rows), failed=len(failed),
                seconds=round(elapsed, 1), cpu_seconds=round(sum(r.get("cpu_s", 0) for r in rows), 1),
                capture_seconds=round(capture_s, 1), jobs=args.jobs,
                load_average=[round(load_before[0], 1), round(os.getloadavg()[0], 1)], command=command)
    if args.merge and os.path.exists(stem + ".json"):
        # a re-check of some kernels after a change: their rows replace the earlier report's, the rest stay
        earlier = json.load(open(stem + ".json"))
        names = {row["kernel"] for row in rows}
        rows = [row for row in earlier["rows"] if row["kernel"] not in names] + rows
        failed = [row for row in rows if row["problems"]]
        meta.update(specialisations=earlier["specialisations"], compiled=len(rows), failed=len(failed),
                    seconds=round(earlier["seconds"] + elapsed, 1),
                    command=f"{earlier['command']}; then {command} (rows of {', '.join(sorted(names))} replaced)")
        for key in ("distinct_compiles", "cpu_seconds", "capture_seconds", "jobs", "load_average"):
            meta.pop(key)  # they describe this run only, not the merged report
    with open(stem + ".json", "w") as f:
        json.dump(dict(meta, rows=rows), f, indent=1)
    header = (f"AOT compile check, triton {meta['triton']}, torch {meta['torch']}, {sweep} sweep: {len(cases)} cases, "
              f"{meta['specialisations']} specialisations x {len(args.arch)} archs, {len(failed)} failing; "
              f"{timing(meta)} (`{meta['command']}`)")
    with open(stem + ".md", "w") as f:
        f.write(markdown(rows, header))
    print(f"wrote {stem}.json/.md: {len(rows)} compiles, {len(failed)} failing; {timing(meta)}")
    return 1 if failed else 0

if __name__ == "__main__":
    sys.exit(main())
