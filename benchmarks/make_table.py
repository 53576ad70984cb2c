"""Turn benchmark JSON (benchmarks/results/*.json) into markdown tables: time and peak memory per
implementation, and fastkd's speed-up over each baseline (medians; from the fastest rounds too where recorded).

    python benchmarks/make_table.py                      # print tables for every result file
    python benchmarks/make_table.py --readme README.md   # also replace the block between the markers
"""
import argparse
import glob
import json
import os
import re
from collections import defaultdict

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
START, END = "<!-- benchmark-tables:start -->", "<!-- benchmark-tables:end -->"


def fmt_time(ms: float) -> str:
    return f"{ms * 1e3:.0f} us" if ms < 1 else f"{ms:.3g} ms"


def fmt_bytes(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} B"


def table(data: dict, op: str) -> str:
    env, rows = data["environment"], data["results"]
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    baselines = [i for i in impls if i != "fastkd"]
    cases = defaultdict(dict)
    for r in rows:  # rows may name their op family (files covering several ops)
        cases[(r.get("family"), tuple(r["shape"]), r["mode"])][r["impl"]] = r
    with_op = any(r.get("family") for r in rows)
    head = ["op"] * with_op + ["shape", "pass"] + [f"{i}: time (peak memory)" for i in impls]
    head += [f"fastkd speed-up vs {b}" for b in baselines]
    lines = [f"**{op}** on {env['device']} (torch {env['torch']}, triton {env['triton']}, commit {env['commit']}, "
             f"{env['date'][:10]})", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (case_op, shape, mode), by_impl in cases.items():
        cells = [case_op] * with_op + ["x".join(map(str, shape)), mode]
        for impl in impls:
            r = by_impl.get(impl)
            if r is None:
                cells.append("-")
            elif "median_ms" not in r:
                cells.append(r.get("status", "failed"))
            else:
                cells.append(f"{fmt_time(r['median_ms'])} ({fmt_bytes(r['peak_memory_bytes'])})")
        for base in baselines:
            ok = all("median_ms" in by_impl.get(i, {}) for i in ("fastkd", base))
            cell = f"{by_impl[base]['median_ms'] / by_impl['fastkd']['median_ms']:.2f}x" if ok else "-"
            if ok and all("min_ms" in by_impl[i] for i in ("fastkd", base)):  # fastest rounds: less noise
                cell += f" (min {by_impl[base]['min_ms'] / by_impl['fastkd']['min_ms']:.2f}x)"
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="*", help="result JSON files (default: benchmarks/results/*.json)")
    parser.add_argument("--readme", help=f"replace the text between {START} and {END} in this file")
    args = parser.parse_args()
    tables = []
    for path in args.files or sorted(glob.glob(os.path.join(RESULTS, "*.json"))):
        op = os.path.basename(path).split("-")[0]
        with open(path) as f:
            data = json.load(f)
        if "environment" in data and "results" in data:  # timing results (the aot-* compile reports are not)
            tables.append(table(data, op))
    text = "\n\n".join(tables)
    print(text)
    if args.readme:
        with open(args.readme) as f:
            readme = f.read()
        if START not in readme or END not in readme:
            raise SystemExit(f"{args.readme} has no {START} ... {END} block")
        readme = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: f"{START}\n{text}\n{END}", readme,
                        flags=re.S)
        with open(args.readme, "w") as f:
            f.write(readme)


if __name__ == "__main__":
    main()
