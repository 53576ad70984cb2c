"""The training loop every recipe uses: epochs over a sharded, reshuffled dataset, evaluation, atomic
checkpoints after every epoch, metrics as JSON lines, resume without redoing finished epochs, DDP."""
import json
import os
import time
from typing import Callable, Dict, List, Optional

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from fastkd.recipes.distributed import Context


def save_atomically(state: dict, path: str) -> None:
    """torch.save to a temporary file, then rename: a killed run never leaves a half-written checkpoint."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    temporary = path + ".tmp"
    torch.save(state, temporary)
    os.replace(temporary, path)


def train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, dataset: Dataset, *, epochs: int,
          batch_size: int, step: Callable, evaluate: Callable[[torch.nn.Module], Dict[str, float]], run_dir: str,
          ctx: Context, seed: int = 0, resume: bool = True, name: str = "", num_workers: int = 0,
          scheduler=None, scaler: Optional[torch.amp.GradScaler] = None) -> List[dict]:
    """Train `model` and return the history (one dict of metrics per epoch).

    step(model, batch, epoch) -> loss; model is DDP-wrapped when distributed. evaluate(model) -> metrics,
    called on every rank (gather inside it). `scheduler` (optional) is stepped after every optimizer step
    taken; `scaler` (optional, for fp16 autocast) scales the loss. After every finished epoch, run_dir/last.pt
    holds model, optimizer, scheduler, scaler, random state, epoch and history, and the metrics are printed and
    appended to run_dir/metrics.jsonl and run_dir/train.log. With `resume`, a run finding last.pt continues it.
    Shuffling is seeded by (seed, epoch), so a resumed run sees the batches the uninterrupted one would.
    """
    checkpoint_path = os.path.join(run_dir, "last.pt")
    start, history = 0, []
    if resume and os.path.exists(checkpoint_path):
        state = torch.load(checkpoint_path, map_location=ctx.device, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        for stateful, key in ((scheduler, "scheduler"), (scaler, "scaler")):
            if stateful is not None:
                stateful.load_state_dict(state[key])
        _set_rng_state(state["rng"], ctx)
        start, history = state["epoch"], state["history"]
    wrapped = (torch.nn.parallel.DistributedDataParallel(model, device_ids=[ctx.device] if ctx.device.type == "cuda"
                                                         else None) if ctx.distributed else model)
    sampler = DistributedSampler(dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=seed)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers, drop_last=True)
    for epoch in range(start, epochs):
        sampler.set_epoch(epoch)
        model.train()
        began, total, batches = time.time(), 0.0, 0
        for batch in _progress(loader, f"{name} epoch {epoch + 1}/{epochs}", ctx):
            batch = [x.to(ctx.device, non_blocking=True) for x in batch]
            loss = step(wrapped, batch, epoch)
            optimizer.zero_grad(set_to_none=True)
            stepped = True
            if scaler is None:
                loss.backward()
                optimizer.step()
            else:
                scale = scaler.get_scale()
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                stepped = scaler.get_scale() >= scale  # a lowered scale means inf/NaN gradients: step skipped
            if scheduler is not None and stepped:
                scheduler.step()
            total, batches = total + loss.detach(), batches + 1
        mean_loss = torch.as_tensor(total, dtype=torch.float64, device=ctx.device) / max(batches, 1)
        if ctx.distributed:  # the mean over ranks: every rank records the same history
            torch.distributed.all_reduce(mean_loss)
            mean_loss /= ctx.world_size
        model.eval()
        with torch.no_grad():
            metrics = evaluate(model)
        record = {"epoch": epoch + 1, "train_loss": float(mean_loss), "seconds": time.time() - began,
                  **metrics}
        history.append(record)
        if ctx.is_main:
            save_atomically({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                             "scheduler": scheduler.state_dict() if scheduler else None,
                             "scaler": scaler.state_dict() if scaler else None,
                             "rng": _rng_state(ctx), "epoch": epoch + 1, "history": history}, checkpoint_path)
            with open(os.path.join(run_dir, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")
            line = f"{name} epoch {epoch + 1}/{epochs}: ".lstrip() + ", ".join(
                f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()
                if k != "epoch" and isinstance(v, (int, float)))  # scalars only: lists stay in metrics.jsonl
            print(line, flush=True)
            with open(os.path.join(run_dir, "train.log"), "a") as f:
                f.write(time.strftime("%Y-%m-%d %H:%M:%S ") + line + "\n")
        if ctx.distributed:  # every rank leaves an epoch only once its checkpoint is on disk
            torch.distributed.barrier()
    return history


def _rng_state(ctx: Context) -> dict:
    """The random state dropout and augmentation draw from, so that a resumed epoch draws what it would have."""
    state = {"cpu": torch.get_rng_state()}
    if ctx.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(ctx.device)
    return state


def _set_rng_state(state: dict, ctx: Context) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and ctx.device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], ctx.device)


def steps_per_epoch(num_samples: int, batch_size: int, ctx: Context) -> int:
    """Optimizer steps in one epoch of train() (each rank's shard, last partial batch dropped)."""
    return -(-num_samples // ctx.world_size) // batch_size


def _progress(loader, description: str, ctx: Context):
    try:
        from tqdm import tqdm
    except ImportError:  # progress bars are optional
        return loader
    return tqdm(loader, desc=description, disable=not ctx.is_main, leave=False, mininterval=1.0)


def load_weights(model: torch.nn.Module, run_dir: str, device: Optional[torch.device] = None) -> bool:
    """Load run_dir/last.pt's model weights into `model`; False if there is no checkpoint."""
    path = os.path.join(run_dir, "last.pt")
    if not os.path.exists(path):
        return False
    model.load_state_dict(torch.load(path, map_location=device or "cpu", weights_only=False)["model"])
    return True
