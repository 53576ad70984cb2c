"""What a recipe reports: the comparison table with the share of the teacher-student gap closed, the summary
over several runs (seeds), results.json (always valid JSON: NaN and infinities become null) and the plot."""
import json
import math
import os
from typing import Dict, List, Optional

import torch


def json_safe(obj, **kwargs) -> str:
    """json.dumps with every non-finite float written as null (JSON has no NaN)."""
    def clean(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value
    return json.dumps(clean(obj), allow_nan=False, **kwargs)


def gap_closed(student: Optional[float], vanilla: Optional[float], teacher: Optional[float]) -> Optional[float]:
    """(student - vanilla) / (teacher - vanilla): the share of the teacher's lead a distilled student recovers.
    None where undefined: a missing or non-finite value, or a teacher not ahead of the vanilla student."""
    values = (student, vanilla, teacher)
    if any(v is None or not math.isfinite(v) for v in values) or teacher <= vanilla:
        return None
    return (student - vanilla) / (teacher - vanilla)


def last_with(history: List[dict], metric: str) -> dict:
    """The last evaluated record of a history (epochs between evaluations have no metrics)."""
    return next((record for record in reversed(history) if metric in record), {})


def results_table(histories: Dict[str, List[dict]], columns: Dict[str, str], metric: str) -> str:
    """| model | column... | gap to teacher closed |, from each model's last evaluated record. columns:
    {record key: header}; the gap is measured on `metric` against "teacher" and "vanilla"."""
    final = {name: last_with(history, metric) for name, history in histories.items()}
    vanilla, teacher = (final.get(k, {}).get(metric) for k in ("vanilla", "teacher"))
    lines = ["| model | " + " | ".join(columns.values()) + " | gap to teacher closed |",
             "|---|" + "---|" * (len(columns) + 1)]
    for name, last in final.items():
        share = None if name in ("teacher", "vanilla") else gap_closed(last.get(metric), vanilla, teacher)
        cells = [_number(last.get(key)) for key in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {'-' if share is None else f'{100 * share:.0f}%'} |")
    return "\n".join(lines)


def summarize(run_dirs, metric: str) -> str:
    """Mean ± std over runs (their results.json) of each model's final `metric`, and the mean share of the gap
    closed over the runs where it is defined (their count shown when some are not)."""
    finals = []
    for run_dir in run_dirs:
        path = os.path.join(run_dir, "results.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such file (is {run_dir} a finished run's --out-dir?)")
        with open(path) as f:
            histories = json.load(f)["histories"]
        finals.append({name: _float(last_with(history, metric).get(metric)) for name, history in histories.items()})
        if finals[-1].keys() != finals[0].keys():
            raise ValueError(f"{run_dir} has models {sorted(finals[-1])}, {run_dirs[0]} has {sorted(finals[0])}: "
                             f"summarize runs of the same methods")
    lines = [f"| model | {metric}, mean ± std over {len(finals)} runs | per run | gap to teacher closed, mean |",
             "|---|---|---|---|"]
    for name in finals[0]:
        values = torch.tensor([final[name] for final in finals], dtype=torch.float64)
        closed = "-"
        if name not in ("teacher", "vanilla") and "vanilla" in finals[0]:
            shares = [gap_closed(f[name], f["vanilla"], f.get("teacher")) for f in finals]
            defined = [s for s in shares if s is not None]
            if defined:
                closed = f"{100 * sum(defined) / len(defined):.0f}%"
                if len(defined) < len(shares):
                    closed += f" ({len(defined)} of {len(shares)} runs; the others' teacher is not ahead)"
        spread = values.std().item() if len(values) > 1 else 0.0
        lines.append(f"| {name} | {values.mean():.1f} ± {spread:.1f} | {' / '.join(f'{v:.1f}' for v in values)} | "
                     f"{closed} |")
    return "\n".join(lines)


def write(out_dir: str, config: dict, histories: Dict[str, List[dict]], table: str, metric: str) -> None:
    """out_dir/results.md (the table), results.json (config and histories) and results.png (the plot)."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        f.write(json_safe({"config": config, "histories": histories}, indent=1))
    plot(histories, os.path.join(out_dir, "results.png"), metric)


def plot(histories: Dict[str, List[dict]], path: str, metric: str) -> None:
    """Test `metric` per epoch for every model, and the final values as bars."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the plot is optional; the table and JSON are always written
        return
    fig, (curves, bars) = plt.subplots(1, 2, figsize=(11, 4))
    for name, history in histories.items():
        points = [(h["epoch"], _float(h[metric])) for h in history if metric in h]
        curves.plot(*zip(*points), marker="o", label=name)
    curves.set(xlabel="epoch", ylabel=f"test {metric}", title=f"test {metric} per epoch")
    curves.legend()
    names = list(histories)
    finals = [_float(last_with(histories[n], metric).get(metric)) for n in names]
    bars.bar(names, finals, color="tab:blue")
    finite = [v for v in finals if math.isfinite(v)]
    if finite:
        bars.set(ylim=(max(0, min(finite) - 5), max(100, max(finite))))
    bars.set(ylabel=f"final test {metric}", title="final comparison")
    bars.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _float(value) -> float:
    return float("nan") if value is None else float(value)


def _number(value) -> str:
    return "nan" if value is None else f"{value:.1f}"
