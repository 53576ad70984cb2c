"""Every GPU kernel once against its float64 reference: the quick check of benchmarks/gpu_suite.sh.

    python -m benchmarks.gpu_check [--out results.json] [--device cuda]

One call per kernel path of each op (MLD elementwise / reduced forward and backward; LED CD and ID forward and
backward, one tile and several; TaT one-tile and online forward, one-program and split backward, both input
layouts; box pool and paint), fp32 and bf16, on fresh random inputs; relative Frobenius error of the loss and every
gradient against float64 on the CPU, NaN never passes. Prints one line per check and writes them as JSON; exit
status 1 if any check fails. On a CPU (--device cpu) it runs the CPU kernels: a smoke test of this script.
"""
import argparse
import json
import sys
import time

import torch

import fastkd
from fastkd import reference

TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2}  # relative Frobenius error, losses and gradients


def relative_error(got, want):
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    if got.shape != want.shape:
        return float("inf")
    if torch.isnan(got).any() or torch.isnan(want).any():
        return float("nan")
    return ((got - want).norm() / want.norm().clamp(min=1e-30)).item()


def compare(fn, ref, inputs, grad_inputs, dtype, device, keep=()):
    """Errors of fn(*inputs on device, dtype) and its gradients w.r.t. inputs[i] for i in grad_inputs, against ref
    on the float64 CPU copies; inputs[i] for i in `keep` (boxes) keep their dtype."""
    ours = [x.to(device, dtype).requires_grad_(i in grad_inputs) if x.is_floating_point() and i not in keep
            else x.to(device) for i, x in enumerate(inputs)]
    exact = [x.double().clone().requires_grad_(i in grad_inputs) if x.is_floating_point() else x
             for i, x in enumerate(inputs)]  # clone: the inputs stay leaves without grad for the next dtype
    out, want = fn(*ours), ref(*exact)
    out, want = (out if isinstance(out, (list, tuple)) else [out]), (want if isinstance(want, (list, tuple)) else [want])
    errors = {f"out{i}": relative_error(o, w) for i, (o, w) in enumerate(zip(out, want))}
    sum(o.float().square().sum() if o.dim() else o.float() for o in out).backward()
    sum(w.square().sum() if w.dim() else w for w in want).backward()
    for i in grad_inputs:
        errors[f"grad{i}"] = relative_error(ours[i].grad, exact[i].grad)
    return errors


def checks(gen):
    """(name, fn, reference, inputs, indices of inputs to differentiate[, indices of inputs kept in float64])."""
    def randn(*shape, scale=1.0):
        return torch.randn(shape, generator=gen, dtype=torch.float64) * scale

    yield ("binary_kl_div none (64, 80)", lambda s, t: fastkd.binary_kl_div(s, t, reduction="none"),
           lambda s, t: reference.binary_kl_div(s, t, reduction="none"), [randn(64, 80, scale=3), randn(64, 80, scale=3)],
           (0, 1))
    yield ("binary_kl_div batchmean (512, 1000)", fastkd.binary_kl_div, reference.binary_kl_div,
           [randn(512, 1000, scale=3), randn(512, 1000, scale=3)], (0,))
    targets = torch.rand(64, 80, generator=gen) < 0.08
    targets[:40, 0] = True  # one class with more than one 32-member tile
    for name in ("led_cd_loss", "led_id_loss"):
        yield (f"{name} (64, 80, 96)", lambda s, t, y, _f=getattr(fastkd, name): _f(s, t, y),
               getattr(reference, name), [randn(64, 80, 96), randn(64, 80, 96), targets], (0,))
    for (B, N, C), layout in [((8, 49, 128), "tokens-last"), ((8, 49, 128), "contiguous"),
                              ((2, 300, 96), "tokens-last"), ((2, 300, 96), "contiguous")]:
        def tat(q, k, v, t, _layout=layout):
            if _layout == "tokens-last":  # what TaTLoss passes: x.flatten(2).transpose(1, 2) of a (B, C, H, W) map
                q, k, v, t = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v, t))
            return fastkd.tat_attention_loss(q, k, v, t)
        yield (f"tat_attention_loss {layout} {(B, N, C)}", tat, reference.tat_attention_loss,
               [randn(B, N, C, scale=0.2), randn(B, N, C, scale=0.2), randn(B, N, C), randn(B, N, C)], (0, 1, 2, 3))
    boxes = torch.tensor([[0.0, 0.0, 64.0, 48.0], [10.0, 5.0, 30.0, 60.0], [0.0, 0.0, 100.0, 80.0]],
                         dtype=torch.float64)
    batch_idx = torch.tensor([0, 1, 1])
    image = (80, 100)
    yield ("box_pool (2, 16, 20, 25)", lambda f, b, i: fastkd.box_pool(f, b.float(), i, image),
           lambda f, b, i: reference.box_pool(f, b, i, image), [randn(2, 16, 20, 25), boxes, batch_idx], (0,), (1,))
    yield ("box_paint (3, 16) -> (2, 16, 20, 25)",
           lambda v, b, i: fastkd.box_paint(v, b.float(), i, image, (2, 16, 20, 25)),
           lambda v, b, i: reference.box_paint(v, b, i, image, (2, 16, 20, 25)), [randn(3, 16), boxes, batch_idx],
           (0,), (1,))


def run_check(index: int, seed: int, device: str):
    """Rows (one per dtype) of check number `index`, inputs drawn from `seed`."""
    name, fn, ref, inputs, grads, *keep = list(checks(torch.Generator().manual_seed(seed)))[index]
    device, rows = torch.device(device), []
    for dtype in (torch.float32, torch.bfloat16):
        started = time.perf_counter()
        try:
            errors = compare(fn, ref, inputs, grads, dtype, device, *keep)
            ok, error = all(e <= TOLERANCE[dtype] for e in errors.values()), None  # NaN fails
            if device.type == "cuda":
                torch.cuda.synchronize()
        except Exception as exc:  # noqa: BLE001 (report and go on)
            errors, ok, error = {}, False, f"{type(exc).__name__}: {str(exc)[:500]}"
        rows.append(dict(check=name, dtype=str(dtype), ok=ok, errors=errors, error=error,
                         seconds=time.perf_counter() - started))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--jobs", type=int, default=1, help="processes (Triton compiles one kernel per CPU core)")
    args = parser.parse_args(argv)
    seed = int(time.time())  # fresh inputs every run
    indices = range(len(list(checks(torch.Generator().manual_seed(seed)))))
    if args.jobs > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor
        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            results = list(pool.map(run_check, indices, [seed] * len(indices), [args.device] * len(indices)))
    else:
        results = [run_check(i, seed, args.device) for i in indices]
    rows = [row for result in results for row in result]
    failed = sum(not row["ok"] for row in rows)
    for row in rows:
        worst = max(row["errors"].values(), default=float("nan"))
        print(f"{'ok  ' if row['ok'] else 'FAIL'} {row['check']} {row['dtype'][6:]}: worst relative error "
              f"{worst:.2e} ({row['seconds']:.1f} s){' ' + row['error'] if row['error'] else ''}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name() if args.device == "cuda" else args.device, seed=seed,
                           torch=torch.__version__, rows=rows, failed=failed), f, indent=1)
    print(f"{len(rows) - failed} passed, {failed} failed")
    return 1 if failed else 0

if __name__ == "__main__":
    sys.exit(main())
