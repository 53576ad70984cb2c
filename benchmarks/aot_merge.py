"""Merge re-check reports into a full-sweep AOT report (benchmarks/aot.py): each re-checked specialisation replaces
its row.

    python benchmarks/aot_merge.py FULL.json OUT_STEM RECHECK.json...
"""
import json
import os
import sys

sys.path.insert(0, os.getcwd())
from benchmarks.aot import markdown  # noqa: E402

base_path, out_stem, *rechecks = sys.argv[1:]
base = json.load(open(base_path))
# a specialisation: kernel, arch, the cases launching it, its constants (warps and BLOCK_K may differ after a
# re-check); each re-checked row must replace exactly one row of the full sweep
key = lambda r: (r["kernel"], r["arch"], tuple(r["cases"]),
                 tuple(sorted((k, v) for k, v in r["constexprs"].items() if k != "BLOCK_K")))
rows = list(base["rows"])
commands, replaced = [], 0
for path in rechecks:
    d = json.load(open(path))
    commands.append(d["command"])
    for r in d["rows"]:
        hits = [i for i, b in enumerate(rows) if key(b) == key(r)]
        assert len(hits) == 1, (key(r), len(hits))
        rows[hits[0]] = r
        replaced += 1

failed = [r for r in rows if r["problems"]]
meta = {k: v for k, v in base.items() if k != "rows"}
meta.update(failed=len(failed), seconds=round(base["seconds"] + sum(json.load(open(p))["seconds"] for p in rechecks), 1),
            command=base["command"] + f"; {replaced} rows then replaced by re-checks after the last tile/warp changes: "
            + "; ".join(commands),
            failed_before_rechecks=base["failed"])
json.dump(dict(meta, rows=rows), open(out_stem + ".json", "w"), indent=1)
header = (f"AOT compile check, triton {meta['triton']}, torch {meta['torch']}, full sweep: {meta['cases']} cases, "
          f"{meta['specialisations']} specialisations x {len(meta['archs'])} archs, {len(failed)} failing "
          f"({meta['failed_before_rechecks']} before the re-checks), {meta['seconds']} s of compilation "
          f"(`{meta['command']}`)")
open(out_stem + ".md", "w").write(markdown(rows, header))
print(out_stem, len(rows), "rows,", replaced, "replaced,", len(failed), "failing")
