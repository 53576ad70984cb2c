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
          ctx: Context, seed: int = 0, resume: bool = True, name: str = "", num_workers: int = 0) -> List[dict]:
    """Train `model` and return the history (one dict of metrics per epoch).

    step(model, batch, epoch) -> loss; model is DDP-wrapped when distributed. evaluate(model) -> metrics,
    called on every rank (gather inside it). run_dir/last.pt holds model, optimizer, epoch and history after
    every finished epoch; with `resume`, a run that finds it continues from there. Shuffling is seeded by
    (seed, epoch), so a resumed run sees the batches the uninterrupted one would have.
    """
    checkpoint_path = os.path.join(run_dir, "last.pt")
    start, history = 0, []
    if resume and os.path.exists(checkpoint_path):
        state = torch.load(checkpoint_path, map_location=ctx.device, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
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
            loss.backward()
            optimizer.step()
            total, batches = total + loss.detach(), batches + 1
        model.eval()
        with torch.no_grad():
            metrics = evaluate(model)
        record = {"epoch": epoch + 1, "train_loss": float(total) / max(batches, 1), "seconds": time.time() - began,
                  **metrics}
        history.append(record)
        if ctx.is_main:
            save_atomically({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch + 1,
                             "history": history}, checkpoint_path)
            with open(os.path.join(run_dir, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")
    return history


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
