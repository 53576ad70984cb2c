"""LGD reference training (label-guided self-distillation for detection): a torchvision detector trained
without (baseline) and with LGD from the same initialisation; COCO AP, AP50, AP75, APs/m/l from pycocotools'
COCOeval on the test split, as a table, JSON and a plot.

Official recipe (megvii-research/LGD; shared/design/recipes.md): iteration-based, linear warm-up then x0.1 at
the steps; SGD (momentum 0.9, weight decay 1e-4) with gradient clipping; two parameter groups, the student
(detector + adapter) and the label-guided modules; for the first `adapter_only_iters` iterations the student's
features are detached in the distillation (only the adapter learns from it), for the first `freeze_body_iters`
the student's bottom-up body gets no gradient; loss = detection(student) + detection(shared head on the
instructive features) + 1 x distillation. The engine runs whole epochs: the run takes ceil(iterations / steps
per epoch) epochs, and the iteration counts (schedule, stages) are optimizer steps.
"""
import math
import os
from dataclasses import dataclass, replace
from typing import Dict, Optional, Tuple

import torch

from fastkd.data.coco_detection import COCODetection
from fastkd.data.digit_detection import DetectionCanvasConfig, DigitDetection
from fastkd.metrics.detection import COCO_METRICS, coco_evaluate, detections_to_coco
from fastkd.models.detection import ARCHITECTURES, build_detector, check_detector_backbone
from fastkd.models.lgd import LabelGuidedTeacher, LGDDetector
from fastkd.recipes import config, distributed, engine, recipe, report
from fastkd.recipes.config import ConfigError, option, results_fields
from fastkd.recipes.recipe import RunConfig, autocast
from fastkd.recipes.schedules import lr_schedule

METHODS = ("baseline", "lgd")
CONTEXT_BOX = {"fcos": False, "retinanet": True, "fasterrcnn": False}         # official R-50 presets
DETACH_APPEARANCE = {"fcos": False, "retinanet": False, "fasterrcnn": True}


@dataclass
class LGDConfig(RunConfig):
    out_dir: str = option("runs/lgd", "where runs, checkpoints, metrics, table and plot go", affects_results=False)
    dataset: str = option("digits", "digits (built in: digit canvases with boxes) or coco (a COCO-format "
                          "instances JSON and image folder per split under --data-root)", choices=("digits", "coco"))
    data_root: Optional[str] = option(None, "coco: the folder holding annotations/instances_{train,val}.json and "
                                      "the image folders (see --train-split, --test-split)", affects_results=False)
    train_split: str = option("train2017", "coco: training split name (annotations/instances_NAME.json, NAME/)")
    test_split: str = option("val2017", "coco: evaluation split name")
    canvas: DetectionCanvasConfig = option(DetectionCanvasConfig(size=80, digit_sizes=(14, 34)), "built-in canvases")
    train_samples: int = option(1600, "built-in canvases for training", check=">=1")
    test_samples: int = option(400, "built-in canvases for testing", check=">=1")
    arch: str = option("fcos", "detector", choices=ARCHITECTURES)
    backbone: str = option("cnn-8-16-32-64", "cnn-W1-W2-W3-W4 (small, random init) or resnet50")
    backbone_weights: Optional[str] = option(None, "resnet50: a local torchvision ResNet-50 state_dict (ImageNet "
                                             "weights; never downloaded); none: random init")
    fpn_channels: int = option(32, "FPN channels (torchvision / official: 256)", check=">=8")
    anchor_scale: Optional[float] = option(None, "anchor side / level stride (none: torchvision's, FCOS 1, "
                                           "RetinaNet 4, Faster R-CNN 8)", check=">0")
    min_sizes: Tuple[int, ...] = option((80,), "shorter image side; several: one drawn per training batch "
                                        "(multi-scale), the last for evaluation (torchvision)", check=">=16")
    max_size: int = option(80, "cap of the longer image side", check=">=16")
    batch_size: int = option(8, "images per process and iteration", check=">=1")
    eval_every: int = option(1000, "evaluate every k epochs (and after the last)", check=">=1",
                             affects_results=False)
    iterations: int = option(400, "optimizer steps of each model (rounded up to whole epochs)", check=">=1")
    warmup_iters: int = option(40, "linear warm-up from lr/1000 (official 1000)", check=">=0")
    lr_steps: Tuple[int, ...] = option((267, 356), "iterations after which the lr is x0.1 (official 120k, 160k "
                                       "of 180k)", check=">=1")
    lr: float = option(0.01, "SGD learning rate (official: RetinaNet/FCOS 0.01, Faster R-CNN 0.02, batch 16)",
                       check=">0")
    label_guided_lr: Optional[float] = option(None, "learning rate of the label-guided modules (none: --lr)",
                                              check=">0")
    momentum: float = option(0.9, "SGD momentum", check=">=0")
    weight_decay: float = option(1e-4, "SGD weight decay (official 1e-4)", check=">=0")
    grad_clip: Optional[float] = option(10.0, "clip the gradient norm to this value (none: no clipping)",
                                        check=">0")
    distill_weight: float = option(1.0, "λ, weight of the distillation term (official 1)", check=">=0")
    adapter_only_iters: int = option(67, "first iterations in which the distillation trains only the adapter "
                                     "(student features detached; official 30k of 180k)", check=">=0")
    freeze_body_iters: int = option(44, "first iterations in which the student's body gets no gradient "
                                    "(official 20k of 180k)", check=">=0")
    context_box: Optional[bool] = option(None, "append a context box per image (none: the official preset of "
                                         "--arch with R-50: RetinaNet yes, FCOS no, Faster R-CNN no)")
    detach_appearance: Optional[bool] = option(None, "detach the student features the appearance embeddings "
                                               "pool (none: official, yes for Faster R-CNN only)")
    encoder_widths: Tuple[int, ...] = option((32, 64, 256), "label encoder PointNet widths (official 64,128,1024)",
                                             check=">=1")
    attention_heads: int = option(8, "relation adapter heads (official 8)", check=">=1")
    methods: Tuple[str, ...] = option(METHODS, "comma-separated models to train", choices=METHODS,
                                      affects_results=False)

    def check(self) -> None:
        try:
            check_detector_backbone(self.backbone)
        except ValueError as error:
            raise ConfigError(f"--backbone: {error}") from None
        if self.backbone_weights is not None and not os.path.isfile(self.backbone_weights):
            raise ConfigError(f"--backbone-weights: no such file {self.backbone_weights!r}")
        if self.backbone_weights is not None and self.backbone != "resnet50":
            raise ConfigError("--backbone-weights is read for --backbone resnet50 only")
        if self.dataset == "coco" and not (self.data_root and os.path.isdir(self.data_root)):
            raise ConfigError(f"--dataset coco needs --data-root, the directory holding annotations/ and the image "
                              f"folders (got {self.data_root!r})")
        if self.dataset == "digits" and self.backbone == "resnet50":
            raise ConfigError("--dataset digits has 1-channel images: use a cnn-W1-W2-W3-W4 backbone")
        if self.fpn_channels % self.attention_heads:
            raise ConfigError(f"--fpn-channels {self.fpn_channels} must be divisible by --attention-heads "
                              f"{self.attention_heads}")
        if self.arch == "fcos" and self.fpn_channels % (32 if self.fpn_channels >= 64 else 2):
            raise ConfigError(f"--fpn-channels {self.fpn_channels}: FCOS's head normalises with GroupNorm(32) (two "
                              f"channels a group under 64 channels): use a multiple of 32, or an even number below 64")
        if len(self.encoder_widths) != 3:
            raise ConfigError(f"--encoder-widths: expected three widths (official 64,128,1024), got "
                              f"{self.encoder_widths}")
        if not self.min_sizes:
            raise ConfigError("--min-sizes: give at least one size")
        if not self.methods:
            raise ConfigError("--methods: name at least one model")


PRESETS = {
    "default": {},
    # seconds on a CPU: to check that everything runs
    "smoke": dict(canvas=dict(size=64, digit_sizes=(14, 28)), train_samples=32, test_samples=16, batch_size=4,
                  backbone="cnn-4-8-8-16", fpn_channels=32, encoder_widths=(8, 8, 16), iterations=4,
                  warmup_iters=1, lr_steps=(3,), adapter_only_iters=2, freeze_body_iters=1, min_sizes=(64,),
                  max_size=64),
}
_OFFICIAL = dict(dataset="coco", backbone="resnet50", fpn_channels=256, encoder_widths=(64, 128, 1024),
                 min_sizes=tuple(range(640, 801, 32)), max_size=1333, batch_size=2, iterations=180000,
                 warmup_iters=1000, lr_steps=(120000, 160000), weight_decay=1e-4, momentum=0.9,
                 adapter_only_iters=30000, freeze_body_iters=20000, distill_weight=1.0)
# The official COCO 2x multi-scale settings (16 images per iteration: 2 per GPU on 8 GPUs). Pass
# --backbone-weights with a local ImageNet ResNet-50 state_dict, --data-root with COCO 2017.
PRESETS.update({
    "coco-retinanet-r50-2x": dict(_OFFICIAL, arch="retinanet", lr=0.01, context_box=True, detach_appearance=False),
    "coco-fcos-r50-2x": dict(_OFFICIAL, arch="fcos", lr=0.01, context_box=False, detach_appearance=False),
    "coco-fasterrcnn-r50-2x": dict(_OFFICIAL, arch="fasterrcnn", lr=0.02, context_box=False, detach_appearance=True),
})


def collate(batch):
    """(images tuple, targets tuple): detection images keep their own sizes until the detector's transform."""
    return tuple(zip(*batch))


def load_data(cfg: LGDConfig) -> dict:
    """{"train": dataset, "test": dataset}, each with num_classes, in_channels, image_ids, category_ids and
    coco_ground_truth()."""
    if cfg.dataset == "digits":
        return {"train": DigitDetection("train", cfg.train_samples, cfg.canvas, cfg.seed),
                "test": DigitDetection("test", cfg.test_samples, cfg.canvas, cfg.seed)}
    root = cfg.data_root
    try:
        return {split: COCODetection(os.path.join(root, "annotations", f"instances_{name}.json"),
                                     os.path.join(root, name), augment=split == "train", drop_empty=split == "train")
                for split, name in (("train", cfg.train_split), ("test", cfg.test_split))}
    except (FileNotFoundError, ValueError) as error:
        raise ConfigError(f"--dataset coco: {error}") from None


def build_model(method: str, cfg: LGDConfig, dataset) -> LGDDetector:
    gray = dataset.in_channels == 1
    detector = build_detector(cfg.arch, dataset.num_classes, backbone=cfg.backbone, fpn_channels=cfg.fpn_channels,
                              in_channels=dataset.in_channels, min_size=cfg.min_sizes, max_size=cfg.max_size,
                              image_mean=[0.1] if gray else None, image_std=[0.3] if gray else None,
                              anchor_scale=cfg.anchor_scale, backbone_weights=cfg.backbone_weights)
    teacher = None
    if method == "lgd":
        teacher = LabelGuidedTeacher(dataset.num_classes, cfg.fpn_channels, cfg.attention_heads,
                                     context_box=CONTEXT_BOX[cfg.arch] if cfg.context_box is None else cfg.context_box,
                                     detach_appearance=(DETACH_APPEARANCE[cfg.arch] if cfg.detach_appearance is None
                                                        else cfg.detach_appearance),
                                     encoder_widths=cfg.encoder_widths)
    return LGDDetector(detector, teacher, cfg.distill_weight)


def make_optimizer(cfg: LGDConfig, model: LGDDetector) -> torch.optim.SGD:
    """SGD with two parameter groups: the student (detector + adapter) and the label-guided modules."""
    guided = {id(p) for p in model.label_guided_parameters()}
    student = [p for p in model.parameters() if p.requires_grad and id(p) not in guided]
    groups = [{"params": student, "lr": cfg.lr, "name": "student"}]
    if guided:
        groups.append({"params": [p for p in model.label_guided_parameters() if p.requires_grad],
                       "lr": cfg.label_guided_lr or cfg.lr, "name": "label_guided"})
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def make_step(method: str, cfg: LGDConfig, scheduler, device: torch.device):
    """step(model, batch, epoch) -> the loss terms; the stage (adapter-only, frozen body) follows the optimizer
    steps taken so far (the scheduler's count, restored on resume)."""
    def step(model, batch, epoch):
        images, targets = batch
        iteration = scheduler.last_epoch
        stages = {} if method == "baseline" else dict(distill_student=iteration >= cfg.adapter_only_iters,
                                                      freeze_body=iteration < cfg.freeze_body_iters)
        with autocast(cfg, device):
            losses = model(list(images), list(targets), **stages)
        return {name: value.float() for name, value in losses.items()}
    return step


def evaluate(model: LGDDetector, dataset, cfg: LGDConfig, ctx: distributed.Context,
             batch_size: int = 16) -> Dict[str, float]:
    """COCOeval of the detector on `dataset`: rank r detects images r, r + W, ...; rank 0 evaluates the gathered
    rows; every rank returns the metrics (percent). An LGD model also reports teacher_AP, ...: its head on the
    instructive features, which are built from the test labels (the official "eval teacher"; not a detector)."""
    indices = list(range(ctx.rank, len(dataset), ctx.world_size))
    rows = {"": [], "teacher_": []} if model.teacher is not None else {"": []}
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=batch_size,
                                         collate_fn=collate, num_workers=_workers(cfg))
    for images, targets in loader:
        images, targets = distributed.to_device((list(images), list(targets)), ctx.device)
        ids = [int(t["image_id"]) for t in targets]
        for prefix in rows:
            with autocast(cfg, ctx.device):
                outputs = model(images, targets, instructive=True) if prefix else model(images)
            on_cpu = [{k: v.float().cpu() if k != "labels" else v.cpu() for k, v in out.items()} for out in outputs]
            rows[prefix] += detections_to_coco(on_cpu, ids, dataset.category_ids)
    metrics = {}
    for prefix, own in rows.items():
        gathered = [row for part in distributed.gather_objects(own, ctx) for row in part]
        if ctx.is_main:
            metrics.update({prefix + k: v for k, v in coco_evaluate(dataset.coco_ground_truth(), gathered).items()})
    return distributed.broadcast_object(metrics, ctx)


def _workers(cfg: LGDConfig) -> int:
    return 0 if cfg.dataset == "digits" else cfg.num_workers


def _train(method: str, cfg: LGDConfig, data: dict, ctx: distributed.Context):
    torch.manual_seed(cfg.seed)  # both methods start from the same detector weights
    model = build_model(method, cfg, data["train"]).to(ctx.device)
    optimizer = make_optimizer(cfg, model)
    steps = engine.steps_per_epoch(len(data["train"]), cfg.batch_size, ctx, cfg.accumulate_steps)
    epochs = math.ceil(cfg.iterations / steps)
    scheduler = lr_schedule("warmup-multistep", optimizer, epochs * steps, warmup_steps=cfg.warmup_iters,
                            milestones=cfg.lr_steps)
    history = engine.train(model, optimizer, data["train"], epochs=epochs, step=make_step(method, cfg, scheduler,
                                                                                         ctx.device),
                           scheduler=scheduler, scaler=recipe.grad_scaler(cfg, ctx.device),
                           evaluate=lambda m: evaluate(m, data["test"], cfg, ctx),
                           run_dir=os.path.join(cfg.out_dir, method), ctx=ctx, name=method,
                           num_workers=_workers(cfg), collate_fn=collate, find_unused_parameters=method == "lgd",
                           config=results_fields(cfg), **recipe.loop_options(cfg))
    return history


def run(cfg: LGDConfig) -> dict:
    """Train every model of cfg.methods; return {name: history} and write out_dir/results.json, results.md and
    results.png."""
    with recipe.session(cfg) as ctx:
        data = load_data(cfg)
        recipe.check_batches(cfg, len(data["train"]), ctx)
        histories = {method: _train(method, cfg, data, ctx) for method in cfg.methods}
        if ctx.is_main:
            report.write(cfg.out_dir, config.to_dict(cfg), histories, results_table(histories), "AP")
    return histories


def results_table(histories: dict) -> str:
    """| model | AP | AP50 | AP75 | APs | APm | APl | AP vs baseline |, from each model's last evaluation; under an
    LGD model, the row of its head on the instructive features."""
    final = {name: report.last_with(history, "AP") for name, history in histories.items()}
    base = final.get("baseline", {}).get("AP")
    lines = ["| model | " + " | ".join(COCO_METRICS) + " | AP vs baseline |",
             "|---|" + "---|" * (len(COCO_METRICS) + 1)]
    for name, last in final.items():
        delta = "-" if name == "baseline" or base is None or "AP" not in last else f"{last['AP'] - base:+.1f}"
        lines.append(f"| {name} | " + " | ".join(_cells(last)) + f" | {delta} |")
        if "teacher_AP" in last:
            lines.append(f"| {name}: head on the instructive features (built from the test labels) | "
                         + " | ".join(_cells(last, "teacher_")) + " | - |")
    return "\n".join(lines)


def _cells(record: dict, prefix: str = "") -> list:
    return [f"{record[prefix + m]:.1f}" if isinstance(record.get(prefix + m), float) and record[prefix + m] >= 0
            else "-" for m in COCO_METRICS]


def config_with(**overrides) -> LGDConfig:
    """LGDConfig with top-level overrides (None values ignored)."""
    return replace(LGDConfig(), **{k: v for k, v in overrides.items() if v is not None})


RECIPE = recipe.Recipe(name="lgd", help="LGD detection self-distillation (built-in digit canvases by default)",
                       config=LGDConfig, run=run, table=results_table, metric="AP",
                       title="LGD ({arch}) on the {dataset} test set, COCO AP", presets=PRESETS)
