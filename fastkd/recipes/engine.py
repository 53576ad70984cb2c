"""The training loop every recipe uses: epochs over a sharded, reshuffled dataset, named loss terms, gradient
accumulation and clipping, per-iteration schedules, evaluation every k epochs, atomic checkpoints after every
epoch, metrics as JSON lines (and TensorBoard when installed), a guard against non-finite losses, resume that
checks the run's settings, DDP with buffers kept identical across ranks."""
import contextlib
import functools
import itertools
import json
import operator
import os
import time
from typing import Callable, Dict, List, Mapping, Optional, Union

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from fastkd.recipes import checkpoints, distributed
from fastkd.recipes.config import ConfigError, refuse_changes
from fastkd.recipes.distributed import Context
from fastkd.recipes.report import json_safe

StepResult = Union[torch.Tensor, Mapping[str, torch.Tensor]]
NONFINITE_POLICIES = ("stop", "skip")


class NonFiniteLossError(RuntimeError):
    """A loss term became NaN or infinite; the message names the run, the term and the step."""


def train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, dataset: Dataset, *, epochs: int,
          batch_size: int, step: Callable[..., StepResult], evaluate: Callable[[torch.nn.Module], Dict[str, float]],
          run_dir: str, ctx: Context, seed: int = 0, resume: bool = True, name: str = "", num_workers: int = 0,
          scheduler=None, scaler: Optional[torch.amp.GradScaler] = None, config: Optional[dict] = None,
          eval_every: int = 1, grad_clip: Optional[float] = None, accumulate_steps: int = 1,
          on_nonfinite: str = "stop", collate_fn=None, find_unused_parameters: bool = False) -> List[dict]:
    """Train `model` and return the history (one dict of metrics per epoch).

    step(model, batch, epoch) -> loss, or {term name: weighted term} whose sum is the loss; model is DDP-wrapped
    when distributed; batch is the loader's batch (any nesting of tensors, lists, tuples, dicts) on ctx.device.
    evaluate(model) -> metrics, called on every rank (gather inside it) after epochs k, 2k, ... (k = eval_every)
    and the last. One optimizer step per `accumulate_steps` batches; gradients clipped to norm `grad_clip`;
    `scheduler` (per iteration) stepped after each optimizer step taken; `scaler` (fp16 autocast) scales the loss.
    A non-finite loss stops the run (NonFiniteLossError) or, with on_nonfinite="skip", drops that step's
    gradients and is counted (skipped_steps). Reading the terms costs one host sync per step (and, under DDP,
    one small all-reduce so that every rank decides alike).

    After every epoch, run_dir/last.pt holds model, optimizer, scheduler, scaler, every rank's random state,
    epoch, history and `config` (the settings that change results). With `resume`, a run finding last.pt
    continues it if its recorded config equals `config` (and the world size), and refuses otherwise, naming the
    fields that differ. Shuffling is seeded by (seed, epoch), so a resumed run sees the batches the
    uninterrupted one would. find_unused_parameters: passed to DDP, for models some of whose parameters get no
    gradient in some steps (e.g. a body frozen for the first iterations).
    """
    if on_nonfinite not in NONFINITE_POLICIES:
        raise ValueError(f"on_nonfinite must be one of {NONFINITE_POLICIES}, got {on_nonfinite!r}")
    recorded = {**(config or {}), "world_size": ctx.world_size, "epochs": epochs}
    checkpoint_path = os.path.join(run_dir, "last.pt")
    start, history = 0, []
    if resume and os.path.exists(checkpoint_path):
        start, history = _resume(checkpoint_path, recorded, model, optimizer, scheduler, scaler, ctx)
    logs = _Logs(run_dir, name, history, ctx) if ctx.is_main else None
    wrapped = (torch.nn.parallel.DistributedDataParallel(model, device_ids=[ctx.device] if ctx.device.type == "cuda"
                                                         else None, find_unused_parameters=find_unused_parameters)
               if ctx.distributed else model)
    sampler = DistributedSampler(dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=seed)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers, drop_last=True,
                        collate_fn=collate_fn)
    steps = len(loader) // accumulate_steps
    optimizer.zero_grad(set_to_none=True)
    try:
        for epoch in range(start, epochs):
            sampler.set_epoch(epoch)
            model.train()
            began = time.time()
            batches = itertools.islice(loader, steps * accumulate_steps)  # no partial accumulation at the end
            sums, skipped = {}, 0
            bar = _progress(batches, f"{name} epoch {epoch + 1}/{epochs}", ctx, steps * accumulate_steps)
            for i, batch in enumerate(bar):
                boundary = (i + 1) % accumulate_steps == 0
                silent = ctx.distributed and not boundary  # no gradient all-reduce inside an accumulation window
                with wrapped.no_sync() if silent else contextlib.nullcontext():
                    terms = _as_terms(step(wrapped, distributed.to_device(batch, ctx.device), epoch))
                    loss = functools.reduce(operator.add, terms.values())
                    values = _read(terms, loss, ctx)
                    if not all(v == v and abs(v) != float("inf") for v in values.values()):
                        where = f"epoch {epoch + 1}, batch {i + 1}"
                        if on_nonfinite == "stop":
                            raise NonFiniteLossError(
                                f"{name or 'training'}: non-finite loss at {where} ("
                                + ", ".join(f"{k} {v:.4g}" for k, v in values.items()) + "); lower the learning "
                                "rate or check the data, or pass --on-nonfinite skip to skip such steps")
                        skipped += 1
                        optimizer.zero_grad(set_to_none=True)  # the whole accumulation window is dropped
                        continue
                    scaled = loss / accumulate_steps if accumulate_steps > 1 else loss
                    (scaled if scaler is None else scaler.scale(scaled)).backward()
                for k, v in values.items():
                    sums[k] = sums.get(k, 0.0) + v
                if hasattr(bar, "set_postfix"):
                    bar.set_postfix({k.removeprefix("train_"): f"{v:.4g}" for k, v in values.items()}, refresh=False)
                if logs is not None:
                    logs.step(values, epoch * steps + i // accumulate_steps)
                if boundary:
                    _optimizer_step(model, optimizer, scheduler, scaler, grad_clip)
            distributed.sync_buffers(model, ctx)
            record = {"epoch": epoch + 1, **{k: v / max(steps - skipped, 1) for k, v in sums.items()},
                      **({"skipped_steps": skipped} if on_nonfinite == "skip" else {}),
                      "seconds": time.time() - began}
            if (epoch + 1) % eval_every == 0 or epoch + 1 == epochs:
                model.eval()
                with torch.no_grad():
                    record.update(evaluate(model))
            history.append(record)
            rng = distributed.gather_objects(_rng_state(ctx), ctx)
            if ctx.is_main:
                checkpoints.save_atomically(
                    {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict() if scheduler else None,
                     "scaler": scaler.state_dict() if scaler else None, "rng": rng, "epoch": epoch + 1,
                     "history": history, "config": json.dumps(recorded, sort_keys=True)}, checkpoint_path)
                logs.epoch(record, epochs)
            if ctx.distributed:  # every rank leaves an epoch only once its checkpoint is on disk
                torch.distributed.barrier()
    finally:
        if logs is not None:
            logs.close()
    return history


def _resume(path, recorded, model, optimizer, scheduler, scaler, ctx):
    hint = "delete it, or pass --no-resume to start this run over"
    state = checkpoints.load_trusted(path, map_location=ctx.device, hint=hint)
    if "config" not in state:
        raise ConfigError(f"{path} records no settings (an older fastkd wrote it), so resuming cannot be checked; "
                          f"{hint}")
    refuse_changes(json.loads(state["config"]), recorded, path)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    for stateful, key in ((scheduler, "scheduler"), (scaler, "scaler")):
        if stateful is not None:
            stateful.load_state_dict(state[key])
    _set_rng_state(state["rng"][ctx.rank], ctx)
    return state["epoch"], state["history"]


def _as_terms(result: StepResult) -> Dict[str, torch.Tensor]:
    return {"loss": result} if isinstance(result, torch.Tensor) else dict(result)


def _read(terms: Dict[str, torch.Tensor], loss: torch.Tensor, ctx: Context) -> Dict[str, float]:
    """{"train_loss": total, "train_<term>": each term (when there are several)} on the host in one transfer,
    averaged over ranks under DDP."""
    named = {"train_loss": loss, **({f"train_{k}": v for k, v in terms.items()} if len(terms) > 1 else {})}
    values = torch.stack([v.detach().to(torch.float64).reshape(()) for v in named.values()])
    if ctx.distributed:
        torch.distributed.all_reduce(values)
        values /= ctx.world_size
    return dict(zip(named, values.tolist()))


def _optimizer_step(model, optimizer, scheduler, scaler, grad_clip) -> None:
    if scaler is None:
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        stepped = True
    else:
        if grad_clip is not None:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scale = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        stepped = scaler.get_scale() >= scale  # a lowered scale means inf/NaN gradients: step skipped
    optimizer.zero_grad(set_to_none=True)
    if scheduler is not None and stepped:
        scheduler.step()


class _Logs:
    """Rank 0's outputs of one run: metrics.jsonl (rewritten from the history on start, so a resumed run's file
    matches its checkpoint), train.log, the console line per epoch, TensorBoard scalars when installed."""

    def __init__(self, run_dir: str, name: str, history: List[dict], ctx: Context):
        os.makedirs(run_dir, exist_ok=True)
        self.run_dir, self.name = run_dir, name
        with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
            f.writelines(json_safe(record) + "\n" for record in history)
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(os.path.join(run_dir, "tensorboard"))
        except ImportError:  # TensorBoard is optional
            self.writer = None

    def step(self, values: Dict[str, float], global_step: int) -> None:
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(f"step/{key}", value, global_step)

    def epoch(self, record: dict, epochs: int) -> None:
        with open(os.path.join(self.run_dir, "metrics.jsonl"), "a") as f:
            f.write(json_safe(record) + "\n")
        scalars = {k: v for k, v in record.items() if k != "epoch" and isinstance(v, (int, float))}
        line = f"{self.name} epoch {record['epoch']}/{epochs}: ".lstrip() + ", ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in scalars.items())
        print(line, flush=True)  # scalars only: lists stay in metrics.jsonl
        with open(os.path.join(self.run_dir, "train.log"), "a") as f:
            f.write(time.strftime("%Y-%m-%d %H:%M:%S ") + line + "\n")
        if self.writer is not None:
            for key, value in scalars.items():
                self.writer.add_scalar(f"epoch/{key}", value, record["epoch"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _rng_state(ctx: Context) -> dict:
    """The random state dropout and augmentation draw from, so that a resumed epoch draws what it would have."""
    state = {"cpu": torch.get_rng_state()}
    if ctx.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(ctx.device)
    return state


def _set_rng_state(state: dict, ctx: Context) -> None:
    torch.set_rng_state(state["cpu"].cpu())
    if "cuda" in state and ctx.device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"].cpu(), ctx.device)


def steps_per_epoch(num_samples: int, batch_size: int, ctx: Context, accumulate_steps: int = 1) -> int:
    """Optimizer steps in one epoch of train() (each rank's shard, last partial batch dropped)."""
    return -(-num_samples // ctx.world_size) // batch_size // accumulate_steps


def _progress(batches, description: str, ctx: Context, total: int):
    try:
        from tqdm import tqdm
    except ImportError:  # progress bars are optional
        return batches
    return tqdm(batches, desc=description, total=total, disable=not ctx.is_main, leave=False, mininterval=1.0)


def load_weights(model: torch.nn.Module, run_dir: str, device: Optional[torch.device] = None) -> bool:
    """Load run_dir/last.pt's model weights into `model` (trusted load); False if there is no checkpoint."""
    path = os.path.join(run_dir, "last.pt")
    if not os.path.exists(path):
        return False
    model.load_state_dict(checkpoints.load_trusted(path, map_location=device or "cpu")["model"])
    return True
