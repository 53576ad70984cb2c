"""L2D reference training: a teacher, then students without and with multi-label distillation
(vanilla, MLD, MLD+CD, MLD+ID, full L2D), evaluated on held-out data; the paper's ablation as a table.

Student loss (official form): BCE_sum(z_s, y) + lambda_mld * MLD(z_s, z_t)
                              + lambda_cd * CD(e_s, e_t, y) + lambda_id * ID(e_s, e_t, y)
with the teacher frozen (eval mode, no gradient) and its outputs cast to float32, as the official recipe.
"""
import json
import os
from dataclasses import asdict, dataclass, field, replace
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

import fastkd
from fastkd import metrics, reference
from fastkd.data import CanvasConfig, DigitCanvases, open_dataset
from fastkd.models import LabelWiseEmbeddingHead, MultiLabelNet, build_backbone
from fastkd.recipes import distributed, engine

METHODS = {  # method -> which distillation terms it uses (MLD, CD, ID)
    "vanilla": (False, False, False),
    "mld": (True, False, False),
    "mld+cd": (True, True, False),
    "mld+id": (True, False, True),
    "l2d": (True, True, True),
}


@dataclass
class L2DConfig:
    out_dir: str = "runs/l2d"
    seed: int = 0
    device: str = "auto"
    amp: Optional[str] = None            # None, "bf16" or "fp16" (GPU autocast)
    dataset: str = "digits"              # built-in canvases, or a real dataset under data_root (REAL_SPLITS)
    data_root: Optional[str] = None
    image_size: int = 224                # real datasets only
    num_workers: int = 4                 # real datasets only: image decoding processes per rank
    canvas: CanvasConfig = field(default_factory=CanvasConfig)
    train_samples: int = 2000            # built-in canvases only
    test_samples: int = 1000
    teacher_backbone: str = "cnn-16-32-64"
    student_backbone: str = "cnn-8-16-32"
    teacher_backbone_weights: Optional[str] = None   # local state_dict files of the backbones (e.g. ImageNet)
    student_backbone_weights: Optional[str] = None
    teacher_checkpoint: Optional[str] = None         # a trained teacher (a run's last.pt or a state_dict): no training
    embed_dim: int = 64
    heads: int = 4
    ffn_dim: int = 128
    teacher_epochs: int = 12             # the teacher trains longer: a strong teacher, students on a budget
    student_epochs: int = 6
    batch_size: int = 32
    lr: float = 2e-3                     # peak learning rate
    lr_schedule: str = "onecycle"        # "onecycle" (per step, 20% warm-up, as ML-Decoder/ASL) or "constant"
    # official weights are 10 / 100 / 1000. MLD: 64 gained most of 10 / 64 / 320 (seed 0; with batchmean and
    # batch 32, MLD's logit gradient then weighs twice BCE's). LED: the official weights collapse a small
    # randomly initialised student (shared/design/observations.md): scaled down, on after a warm-up.
    lambda_mld: float = 64.0
    mld_temperature: float = 1.0         # official: 1; T > 1 softens both sides, the loss is scaled by T^2
    lambda_cd: float = 3.0
    lambda_id: float = 30.0
    led_warmup_epochs: int = 2
    mean_floor: float = 0.0
    loss_impl: str = "fastkd"            # "fastkd" ops or the plain "reference" formulas
    methods: Tuple[str, ...] = tuple(METHODS)
    resume: bool = True


REAL_SPLITS = {"voc2007": ("trainval", "test"), "coco2014": ("train", "val"), "image-list": ("train", "test")}


def load_data(cfg: L2DConfig) -> dict:
    """{"train": dataset, "test": dataset}: the built-in canvases, or cfg.dataset's (train, test) REAL_SPLITS
    (training images flipped at random)."""
    if cfg.dataset == "digits":
        return {"train": DigitCanvases("train", cfg.train_samples, cfg.canvas, cfg.seed),
                "test": DigitCanvases("test", cfg.test_samples, cfg.canvas, cfg.seed)}
    if cfg.dataset not in REAL_SPLITS:
        raise ValueError(f"dataset must be 'digits' or one of {sorted(REAL_SPLITS)}, got {cfg.dataset!r}")
    if cfg.data_root is None:
        raise ValueError(f"dataset {cfg.dataset!r} needs data_root (--data-root), the directory holding it")
    train, test = REAL_SPLITS[cfg.dataset]
    return {"train": open_dataset(cfg.dataset, cfg.data_root, train, cfg.image_size, augment=True),
            "test": open_dataset(cfg.dataset, cfg.data_root, test, cfg.image_size)}


def build_model(backbone: str, cfg: L2DConfig, num_classes: int = 10, in_channels: int = 1,
                weights: Optional[str] = None) -> MultiLabelNet:
    net, channels = build_backbone(backbone, in_channels, weights)
    return MultiLabelNet(net, LabelWiseEmbeddingHead(channels, num_classes, cfg.embed_dim, cfg.heads, cfg.ffn_dim))


def model_for(backbone: str, cfg: L2DConfig, dataset, weights: Optional[str] = None) -> MultiLabelNet:
    """build_model with the dataset's number of classes and image channels."""
    return build_model(backbone, cfg, dataset.num_classes, dataset.in_channels, weights)


def distillation_terms(cfg: L2DConfig, process_group=None):
    """(mld, cd, id) loss functions of the chosen implementation. Under DDP, fastkd's CD spans the global
    batch through `process_group` (a class's group has members on every rank); ID's groups are per image."""
    floor, temperature = dict(mean_floor=cfg.mean_floor), cfg.mld_temperature
    if cfg.loss_impl == "reference":
        if process_group is not None:
            raise ValueError("loss_impl='reference' computes CD on each rank's batch only; use 'fastkd' under DDP")
        mld = (reference.binary_kl_div_official if temperature == 1 else
               lambda s, t: temperature ** 2 * reference.binary_kl_div(s, t, temperature=temperature))
        return (mld,
                lambda s, t, y: reference.led_cd_loss(s, t, y, **floor),
                lambda s, t, y: reference.led_id_loss(s, t, y, **floor))
    if cfg.loss_impl != "fastkd":
        raise ValueError(f"loss_impl must be 'fastkd' or 'reference', got {cfg.loss_impl!r}")
    return (lambda s, t: temperature ** 2 * fastkd.binary_kl_div(s, t, temperature=temperature),
            lambda s, t, y: fastkd.led_cd_loss(s, t, y, process_group=process_group, **floor),
            lambda s, t, y: fastkd.led_id_loss(s, t, y, **floor))


def _autocast(cfg: L2DConfig, device: torch.device):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def _full_precision(*tensors):
    """Autocast outputs up to float32 before the losses, as the official recipe (float64 stays float64)."""
    return [x.to(torch.promote_types(x.dtype, torch.float32)) for x in tensors]


def make_step(method: str, cfg: L2DConfig, teacher: Optional[torch.nn.Module], device: torch.device,
              process_group=None):
    use_mld, use_cd, use_id = METHODS[method]
    mld, cd, id_ = distillation_terms(cfg, process_group)

    def step(model, batch, epoch):
        images, targets = batch
        with _autocast(cfg, device):
            logits, embeddings = model(images)
        logits, embeddings = _full_precision(logits, embeddings)
        loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="sum")
        if teacher is None or not (use_mld or use_cd or use_id):
            return loss
        with torch.no_grad(), _autocast(cfg, device):
            t_logits, t_embeddings = teacher(images)
        t_logits, t_embeddings = _full_precision(t_logits, t_embeddings)
        if use_mld:
            loss = loss + cfg.lambda_mld * mld(logits, t_logits)
        if epoch >= cfg.led_warmup_epochs:
            if use_cd:
                loss = loss + cfg.lambda_cd * cd(embeddings, t_embeddings, targets)
            if use_id:
                loss = loss + cfg.lambda_id * id_(embeddings, t_embeddings, targets)
        return loss

    return step


def evaluate(model, dataset, cfg: L2DConfig, ctx: distributed.Context) -> Dict[str, float]:
    """mAP, per-class AP (None for a class without positives), OF1 and CF1 (both conventions) over `dataset`,
    each rank scoring its own shard, gathered."""
    shard = torch.utils.data.Subset(dataset, range(ctx.rank, len(dataset), ctx.world_size))
    scores, targets = [], []
    for images, labels in torch.utils.data.DataLoader(shard, batch_size=256, num_workers=_workers(cfg)):
        with _autocast(cfg, ctx.device):
            logits, _ = model(images.to(ctx.device))
        scores.append(torch.sigmoid(logits.float()))
        targets.append(labels.to(ctx.device))
    scores = distributed.gather_rows(torch.cat(scores), ctx).cpu()
    targets = distributed.gather_rows(torch.cat(targets), ctx).cpu()
    per_class_ap = metrics.average_precision(scores, targets)
    m_ap, skipped = metrics.mean_over_classes_with_positives(per_class_ap)
    per_class = [None if ap != ap else 100 * ap for ap in per_class_ap.tolist()]
    result = {"mAP": 100 * m_ap, "classes_without_positives": skipped, "AP_per_class": per_class}
    result.update({k: 100 * v for k, v in metrics.threshold_scores(scores, targets).items()
                   if k in ("OF1", "CF1", "CF1_mean")})
    return result


def _workers(cfg: L2DConfig) -> int:
    return 0 if cfg.dataset == "digits" else cfg.num_workers  # canvases are in memory already


def train_model(name: str, backbone: str, epochs: int, cfg: L2DConfig, data, ctx, teacher=None,
                weights: Optional[str] = None):
    torch.manual_seed(cfg.seed)
    model = model_for(backbone, cfg, data["train"], weights).to(ctx.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    scheduler = None
    if cfg.lr_schedule == "onecycle":
        steps = engine.steps_per_epoch(len(data["train"]), cfg.batch_size, ctx)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, cfg.lr, total_steps=max(epochs * steps, 1),
                                                        pct_start=0.2)
    elif cfg.lr_schedule != "constant":
        raise ValueError(f"lr_schedule must be 'onecycle' or 'constant', got {cfg.lr_schedule!r}")
    scaler = torch.amp.GradScaler(ctx.device.type) if cfg.amp == "fp16" else None
    method = "vanilla" if teacher is None else name
    history = engine.train(model, optimizer, data["train"], epochs=epochs, batch_size=cfg.batch_size,
                           step=make_step(method, cfg, teacher, ctx.device, distributed.group(ctx)),
                           scheduler=scheduler, scaler=scaler,
                           evaluate=lambda m: evaluate(m, data["test"], cfg, ctx),
                           run_dir=os.path.join(cfg.out_dir, name), ctx=ctx, seed=cfg.seed, resume=cfg.resume,
                           name=name, num_workers=_workers(cfg))
    return model, history


def run(cfg: L2DConfig) -> dict:
    """Train the teacher and every student in cfg.methods; return {name: history} and write
    out_dir/results.json, out_dir/results.md (the table) and out_dir/results.png (curves and bars)."""
    ctx = distributed.init(cfg.device)
    data = load_data(cfg)
    if cfg.teacher_checkpoint:
        teacher = model_for(cfg.teacher_backbone, cfg, data["train"]).to(ctx.device)
        state = torch.load(cfg.teacher_checkpoint, map_location=ctx.device, weights_only=False)
        teacher.load_state_dict(state.get("model", state))
        teacher_history = [{"epoch": 0, **evaluate(teacher.eval(), data["test"], cfg, ctx)}]
    else:
        teacher, teacher_history = train_model("teacher", cfg.teacher_backbone, cfg.teacher_epochs, cfg, data, ctx,
                                               weights=cfg.teacher_backbone_weights)
    teacher.eval().requires_grad_(False)
    histories = {"teacher": teacher_history}
    for method in cfg.methods:
        _, histories[method] = train_model(method, cfg.student_backbone, cfg.student_epochs, cfg, data, ctx,
                                           teacher=teacher, weights=cfg.student_backbone_weights)
    if ctx.is_main:
        write_report(cfg, histories)
    return histories


def results_table(histories: dict) -> str:
    vanilla = histories.get("vanilla", [{}])[-1].get("mAP")
    teacher = histories["teacher"][-1]["mAP"]
    lines = ["| model | mAP | OF1 | CF1 | CF1 (mean of per-class F1) | gap to teacher closed |",
             "|---|---|---|---|---|---|"]
    for name, history in histories.items():
        last = history[-1]
        closed = ("-" if name in ("teacher", "vanilla") or vanilla is None or teacher == vanilla
                  else f"{100 * (last['mAP'] - vanilla) / (teacher - vanilla):.0f}%")
        lines.append(f"| {name} | {last['mAP']:.1f} | {last['OF1']:.1f} | {last['CF1']:.1f} | "
                     f"{last['CF1_mean']:.1f} | {closed} |")
    return "\n".join(lines)


def summarize(run_dirs) -> str:
    """Mean and spread over several runs (e.g. seeds) of their results.json: final test mAP per model, and the
    share of the teacher-vanilla gap each student closes, averaged over runs."""
    finals = []
    for run_dir in run_dirs:
        with open(os.path.join(run_dir, "results.json")) as f:
            finals.append({name: history[-1]["mAP"] for name, history in json.load(f)["histories"].items()})
        if finals[-1].keys() != finals[0].keys():
            raise ValueError(f"{run_dir} has models {sorted(finals[-1])}, {run_dirs[0]} has {sorted(finals[0])}: "
                             f"summarize runs of the same methods")
    lines = [f"| model | mAP, mean ± std over {len(finals)} runs | per run | gap to teacher closed, mean |",
             "|---|---|---|---|"]
    for name in finals[0]:
        values = torch.tensor([final[name] for final in finals], dtype=torch.float64)
        closed = "-"
        if name not in ("teacher", "vanilla") and "vanilla" in finals[0]:
            shares = [(f[name] - f["vanilla"]) / (f["teacher"] - f["vanilla"]) for f in finals]
            closed = f"{100 * sum(shares) / len(shares):.0f}%"
        spread = values.std().item() if len(values) > 1 else 0.0
        lines.append(f"| {name} | {values.mean():.1f} ± {spread:.1f} | {' / '.join(f'{v:.1f}' for v in values)} | "
                     f"{closed} |")
    return "\n".join(lines)


def write_report(cfg: L2DConfig, histories: dict) -> None:
    os.makedirs(cfg.out_dir, exist_ok=True)
    table = results_table(histories)
    with open(os.path.join(cfg.out_dir, "results.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(cfg.out_dir, "results.json"), "w") as f:
        json.dump({"config": asdict(cfg), "histories": histories}, f, indent=1)
    plot(histories, os.path.join(cfg.out_dir, "results.png"))


def plot(histories: dict, path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the plot is optional; the table and JSON are always written
        return
    fig, (curves, bars) = plt.subplots(1, 2, figsize=(11, 4))
    for name, history in histories.items():
        curves.plot([h["epoch"] for h in history], [h["mAP"] for h in history], marker="o", label=name)
    curves.set(xlabel="epoch", ylabel="test mAP (%)", title="test mAP per epoch")
    curves.legend()
    names = list(histories)
    bars.bar(names, [histories[n][-1]["mAP"] for n in names], color="tab:blue")
    low = min(histories[n][-1]["mAP"] for n in names)
    bars.set(ylim=(max(0, low - 5), 100), ylabel="final test mAP (%)", title="final comparison")
    bars.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def config_with(**overrides) -> L2DConfig:
    """L2DConfig with top-level overrides (None values ignored)."""
    return replace(L2DConfig(), **{k: v for k, v in overrides.items() if v is not None})
