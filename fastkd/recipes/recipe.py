"""What every recipe shares: the common options (RunConfig), the registry entry a recipe declares (Recipe), the
start of a run (validated options, writable and locked out-dir, resolved config printed and saved), the checks
that need the data, teacher loading and freezing, sharded evaluation, autocast and the engine's loop options."""
import contextlib
import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Callable, Dict, Mapping, Optional, Tuple

import torch

from fastkd.recipes import checkpoints, config, distributed, engine
from fastkd.recipes.config import ConfigError, option


@dataclass
class RunConfig:
    """Options of every recipe; a recipe's config subclasses it (and may override a default, e.g. out_dir)."""
    out_dir: str = option("runs/run", "where checkpoints, metrics, table and plot go", affects_results=False)
    seed: int = option(0, "seed of the data, the initialisation and the shuffling")
    device: str = option("auto", "auto (CUDA if available), cpu or cuda", choices=("auto", "cpu", "cuda"),
                         affects_results=False)
    amp: Optional[str] = option(None, "autocast the forward passes (GPU); fp16 adds a gradient scaler",
                                choices=("bf16", "fp16"))
    batch_size: int = option(32, "batch size per process", check=">=1")
    accumulate_steps: int = option(1, "batches per optimizer step (gradient accumulation)", check=">=1")
    grad_clip: Optional[float] = option(None, "clip the gradient norm to this value (none: no clipping)", check=">0")
    on_nonfinite: str = option("stop", "a NaN/Inf loss stops the run, or its step is skipped and counted",
                               choices=engine.NONFINITE_POLICIES)
    eval_every: int = option(1, "evaluate every k epochs (and after the last)", check=">=1", affects_results=False)
    num_workers: int = option(4, "data-loading processes per rank (real datasets)", check=">=0",
                              affects_results=False)
    collective_timeout: float = option(600.0, "seconds a DDP collective waits for a stopped rank before failing",
                                       check=">0", affects_results=False)
    resume: bool = option(True, "continue the runs checkpointed in --out-dir if their settings match "
                          "(--no-resume starts over)", affects_results=False)

    def check(self) -> None:
        """Checks across fields; a recipe's config extends it and raises ConfigError."""


@dataclass(frozen=True)
class Recipe:
    """A `fastkd-train` subcommand: its config class (the options), how to run it and how to report it."""
    name: str
    help: str
    config: type                                     # a RunConfig subclass
    run: Callable[..., Dict[str, list]]              # run(cfg) -> {model name: history}, on every rank
    table: Callable[[Dict[str, list]], str]          # the comparison table of the histories
    metric: str                                      # headline test metric (summaries, plot)
    title: str                                       # printed above the table; str.format'ed with the config
    presets: Mapping[str, dict] = dataclasses.field(default_factory=dict)


@contextlib.contextmanager
def session(cfg: RunConfig):
    """Start a run: options validated before anything else, the process group joined, and on rank 0 the out-dir
    checked writable, locked for the run's duration, and its resolved config printed and saved
    (out_dir/config.json). A failure on rank 0 is raised on every rank. Yields the distributed context."""
    config.validate(cfg)
    cfg.check()
    ctx = distributed.init(cfg.device, cfg.collective_timeout)
    with contextlib.ExitStack() as stack:
        error = None
        if ctx.is_main:
            try:
                _check_writable(cfg.out_dir)
                stack.enter_context(checkpoints.exclusive(cfg.out_dir))
                if cfg.resume:
                    _check_resumable(cfg)
                print(f"config ({type(cfg).__name__}):\n{config.render(cfg)}", flush=True)
                with open(os.path.join(cfg.out_dir, "config.json"), "w") as f:
                    json.dump(config.to_dict(cfg), f, indent=1)
            except (ConfigError, checkpoints.CheckpointError) as failure:
                error = failure
        error = distributed.broadcast_object(error, ctx)
        if error is not None:
            raise error
        yield ctx


def _check_writable(directory: str) -> None:
    try:
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, f".write-test-{os.getpid()}"), "w"):
            pass
        os.remove(os.path.join(directory, f".write-test-{os.getpid()}"))
    except OSError as error:
        raise ConfigError(f"--out-dir {directory} is not writable ({error.strerror or error})") from None


def _check_resumable(cfg: RunConfig) -> None:
    """Refuse to resume an out-dir whose config.json differs from cfg in a field that changes results (each
    model's checkpoint is checked again by the engine)."""
    path = os.path.join(cfg.out_dir, "config.json")
    if not os.path.isfile(path):
        return
    try:
        with open(path) as f:
            previous = config.resolve(type(cfg), json.load(f))
    except (OSError, ValueError) as error:
        raise ConfigError(f"{path} is unreadable ({error}); pass --no-resume to start over there") from None
    config.refuse_changes(config.results_fields(previous), config.results_fields(cfg), cfg.out_dir)


def check_batches(cfg: RunConfig, train_size: int, ctx: distributed.Context) -> None:
    """Refuse a batch (times accumulation) larger than each rank's share of the training set: no step would
    be taken and the run would report an untrained model."""
    per_rank = -(-train_size // ctx.world_size)
    if cfg.batch_size * cfg.accumulate_steps > per_rank:
        raise ConfigError(f"--batch-size {cfg.batch_size} x --accumulate-steps {cfg.accumulate_steps} exceeds the "
                          f"{per_rank} training samples of each of the {ctx.world_size} process(es): no optimizer "
                          f"step would be taken")


def loop_options(cfg: RunConfig) -> dict:
    """engine.train's keyword arguments that come straight from the common options."""
    return dict(batch_size=cfg.batch_size, seed=cfg.seed, resume=cfg.resume, eval_every=cfg.eval_every,
                grad_clip=cfg.grad_clip, accumulate_steps=cfg.accumulate_steps, on_nonfinite=cfg.on_nonfinite)


def autocast(cfg: RunConfig, device: torch.device):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def grad_scaler(cfg: RunConfig, device: torch.device) -> Optional[torch.amp.GradScaler]:
    return torch.amp.GradScaler(device.type) if cfg.amp == "fp16" else None


def load_state_dict(path: str, what: str) -> dict:
    """A trusted (weights_only) load of a weight file: a bare state_dict, or a run checkpoint's "model"."""
    state = checkpoints.load_trusted(path, map_location="cpu", hint=f"{what} must be a state_dict or a last.pt")
    return state.get("model", state) if isinstance(state, dict) else state


def full_precision(*tensors: torch.Tensor) -> list:
    """Autocast outputs up to float32 before the losses, as the official recipes (float64 stays float64)."""
    return [x.to(torch.promote_types(x.dtype, torch.float32)) for x in tensors]


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """Eval mode and no gradients: a teacher as the official recipes use it."""
    return model.eval().requires_grad_(False)


def predict(model: torch.nn.Module, dataset, ctx: distributed.Context, forward: Callable, *, batch_size: int = 256,
            num_workers: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """(forward(model, inputs), targets) over the whole dataset, on the CPU: rank r scores samples r, r + W, ...
    and the rows are gathered in rank order (none duplicated)."""
    shard = torch.utils.data.Subset(dataset, range(ctx.rank, len(dataset), ctx.world_size))
    outputs, targets = [], []
    for inputs, labels in torch.utils.data.DataLoader(shard, batch_size=batch_size, num_workers=num_workers):
        outputs.append(forward(model, inputs.to(ctx.device)))
        targets.append(labels.to(ctx.device))
    return (distributed.gather_rows(torch.cat(outputs), ctx).cpu(),
            distributed.gather_rows(torch.cat(targets), ctx).cpu())


class StudentWithHead(torch.nn.Module):
    """A student network and, for the distilling methods, the head that computes its term against the teacher's
    feature (trained with it, kept in its checkpoint). The term runs in float32 on the full-precision maps, the
    student's map average-pooled to the teacher's size when they differ; loss_impl="reference" computes it with
    reference_term(head, student_map, teacher_map) instead of the head's op.

    forward(images, teacher_feature=None) -> (logits, feature, term or None)."""

    def __init__(self, net: torch.nn.Module, head: Optional[torch.nn.Module] = None,
                 reference_term: Optional[Callable] = None, loss_impl: str = "fastkd"):
        super().__init__()
        self.net, self.head, self.reference_term, self.loss_impl = net, head, reference_term, loss_impl

    def forward(self, images, teacher_feature=None):
        logits, feature = self.net(images)
        if self.head is None or teacher_feature is None:
            return logits, feature, None
        student, teacher = full_precision(feature, teacher_feature.detach())
        if student.shape[2:] != teacher.shape[2:]:
            student = torch.nn.functional.adaptive_avg_pool2d(student, teacher.shape[2:])
        with torch.autocast(images.device.type, enabled=False):
            if self.loss_impl == "reference":
                return logits, feature, self.reference_term(self.head, student, teacher)
            return logits, feature, self.head(student, teacher)
