"""TaT reference training, segmentation: a DeepLabV3+-style teacher, then students trained without distillation
(vanilla) and with hierarchical TaT (patch-group term only, anchor-point term only, both); mIoU, pixel accuracy
and per-class IoU on held-out data, as the paper's table.

Official form (sihaoevery/TaT-seg; shared/design/recipes.md): the distilled feature is the decoder's second
conv + BN output before its ReLU (256 channels at stride 4 there; --decoder-channels here); q = E_q(student),
k = E_k(teacher), v = E_v(student) with E = Conv1x1 (no bias) + BN to the teacher's channels, target = the raw
teacher feature, detached (fastkd.nn.HierarchicalTaTLoss). Loss = CE (ignore 255) + alpha * (beta * patch-group
term + gamma * anchor-point term), i.e. δ = αβ, ζ = αγ. Differences from the official code, all documented in
the README: the teacher is frozen in eval mode (the official code leaves it in train mode), no blur augmentation
on VOC (SBD: --sbd-root), and the TaT term ramps up over --tat-warmup-epochs (default 4; official 0). As in the
official code the embeddings' BN sees one image at a time (--embed-bn per-image; batch: the whole batch).
"""
import functools
import os
from dataclasses import dataclass, replace
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from fastkd import metrics, reference
from fastkd.data.digit_numbers import DigitSegmentation, SegmentationCanvasConfig
from fastkd.data.sbd import VOCTrainAug
from fastkd.data.voc_segmentation import VOCSegmentation2012
from fastkd.models import DeepLabV3Plus, check_backbone_name, from_torchvision_resnet
from fastkd.nn import HierarchicalTaTLoss
from fastkd.nn.tat_attention_loss import SEGMENTATION_CONFIGS
from fastkd.recipes import config, distributed, engine, recipe, report
from fastkd.recipes.config import ConfigError, option, results_fields
from fastkd.recipes.recipe import RunConfig, autocast
from fastkd.recipes.schedules import lr_schedule
from fastkd.recipes.teacher_features import WithTeacherFeatures

METHODS = {  # method -> (patch-group term, anchor-point term)
    "vanilla": (False, False),
    "tat-patch": (True, False),
    "tat-anchor": (False, True),
    "tat": (True, True),
}


@dataclass
class TaTSegConfig(RunConfig):
    out_dir: str = option("runs/tat-seg", "where runs, checkpoints, metrics, table and plot go",
                          affects_results=False)
    dataset: str = option("canvases", "canvases (built in: digits with per-pixel masks) or voc2012 under "
                          "--data-root", choices=("canvases", "voc2012"))
    data_root: Optional[str] = option(None, "voc2012: the folder holding VOCdevkit/VOC2012", affects_results=False)
    sbd_root: Optional[str] = option(None, "voc2012: also train on SBD, the folder benchmark_RELEASE/dataset (VOC "
                                     "train + SBD minus VOC val: the 10,582-image train_aug set)")
    batch_size: int = option(32, "batch size per process", check=">=1")
    crop_size: int = option(513, "voc2012: training crop side", check=">=8")
    canvas: SegmentationCanvasConfig = option(SegmentationCanvasConfig(), "built-in canvases")
    train_samples: int = option(3000, "built-in canvases for training", check=">=1")
    test_samples: int = option(500, "built-in canvases for testing", check=">=1")
    teacher_backbone: str = option("cnn-8-16-32-64", "cnn-W1-W2-W3-W4..., resnet18/34/50/101 or mobilenet_v2")
    student_backbone: str = option("cnn-4-8-16-32", "as --teacher-backbone")
    teacher_decoder_channels: int = option(32, "teacher's ASPP and decoder width (official 256)", check=">=1")
    student_decoder_channels: int = option(16, "students' ASPP and decoder width (official 256)", check=">=1")
    aspp_rates: Tuple[int, ...] = option((1, 2, 3), "ASPP dilation rates (official 6,12,18 at output stride 16)",
                                         check=">=1")
    teacher_checkpoint: Optional[str] = option(None, "use this trained teacher (a last.pt or a state_dict)")
    teacher_backbone_weights: Optional[str] = option(None, "local state_dict file for the teacher's backbone")
    student_backbone_weights: Optional[str] = option(None, "local state_dict file for the students' backbone")
    teacher_epochs: int = option(12, "epochs of the teacher", check=">=1")
    student_epochs: int = option(10, "epochs of each student", check=">=1")
    optimizer: str = option("adamw", "adamw, or sgd (Nesterov, momentum 0.9; official)", choices=("adamw", "sgd"))
    lr: float = option(8e-3, "peak learning rate (ASPP and decoder: x --head-lr-factor)", check=">0")
    head_lr_factor: float = option(1.0, "lr multiplier of ASPP + decoder (official 10 with SGD)", check=">0")
    weight_decay: float = option(5e-4, "weight decay (official 5e-4)", check=">=0")
    lr_schedule: str = option("onecycle", "onecycle, constant, cosine (official for students) or poly",
                              choices=("onecycle", "constant", "cosine", "poly"))
    tat_config: str = option("custom", "custom (the --grid... options) or an official setting: "
                             + ", ".join(SEGMENTATION_CONFIGS), choices=("custom", *SEGMENTATION_CONFIGS))
    grid: Tuple[int, ...] = option((2, 2), "custom: patch grid n,m", check=">=1")
    groups: int = option(2, "custom: patch groups", check=">=1")
    anchor_grid: Tuple[int, ...] = option((4, 4), "custom: anchor grid", check=">=1")
    alpha: float = option(0.1, "custom: alpha (official VOC ResNet-18: 0.1)", check=">=0")
    beta: float = option(1.0, "custom: beta, weight of the patch-group term (delta = alpha beta)", check=">=0")
    gamma: float = option(0.4, "custom: gamma, weight of the anchor term (zeta = alpha gamma)", check=">=0")
    # not official (0): from scratch, the near one-hot attention of random embeddings can derail the first epochs
    # (seed 1: tat-patch 28.9 vs vanilla 37.7 without, 36.1 with a 4-epoch ramp); chosen on seeds 1 and 2
    tat_warmup_epochs: int = option(4, "the TaT term's weight rises linearly over the first K student epochs, "
                                    "epoch e (from 0) weighing min(1, (e + 1) / (K + 1)) (official: 0, full "
                                    "from the start)", check=">=0")
    tat_scale: float = option(1.0, "the attention logits' factor, softmax(scale q k^T) (official 1: no "
                              "1/sqrt(d))", check=">0")
    # per-image (official) since #13: seed 1's tat 34.8 -> 36.5 (vanilla 37.7); seeds 0, 2: 38.7 -> 38.8, 38.4 -> 37.7
    embed_bn: str = option("per-image", "statistics of the TaT embeddings' BN in training: per-image (official: "
                           "each image's positions alone) or batch (the whole batch)", choices=("per-image", "batch"))
    loss_impl: str = option("fastkd", "fastkd's ops or the plain reference formulas", choices=("fastkd", "reference"))
    methods: Tuple[str, ...] = option(tuple(METHODS), "comma-separated students to train", choices=METHODS,
                                      affects_results=False)

    def tat_settings(self) -> dict:
        if self.tat_config != "custom":
            return dict(SEGMENTATION_CONFIGS[self.tat_config])
        return dict(grid=self.grid, groups=self.groups, anchor_grid=self.anchor_grid, alpha=self.alpha,
                    beta=self.beta, gamma=self.gamma)

    def check(self) -> None:
        if self.dataset == "voc2012" and not (self.data_root and os.path.isdir(self.data_root)):
            raise ConfigError(f"--dataset voc2012 needs --data-root, the directory holding VOCdevkit "
                              f"(got {self.data_root!r})")
        if self.sbd_root is not None and (self.dataset != "voc2012" or not os.path.isdir(self.sbd_root)):
            raise ConfigError(f"--sbd-root needs --dataset voc2012 and a directory holding SBD's img/, cls/, "
                              f"train.txt, val.txt (got --dataset {self.dataset}, --sbd-root {self.sbd_root!r})")
        for name in ("teacher_backbone", "student_backbone"):
            value = getattr(self, name)
            try:
                check_backbone_name(value)
            except ValueError as error:
                raise ConfigError(f"--{name.replace('_', '-')}: {error}") from None
            if value.startswith("cnn-") and len(value.split("-")) < 5:
                raise ConfigError(f"--{name.replace('_', '-')}: a segmentation backbone needs 4 stages "
                                  f"(cnn-W1-W2-W3-W4), got {value!r}")
        for name in ("grid", "anchor_grid"):
            if len(getattr(self, name)) != 2:
                raise ConfigError(f"--{name.replace('_', '-')}: expected two numbers (rows,columns)")
        settings = self.tat_settings()
        patches = settings["grid"][0] * settings["grid"][1]
        if patches % settings["groups"]:
            raise ConfigError(f"--groups {settings['groups']} must divide the {patches} patches of --grid")
        for name in ("teacher_checkpoint", "teacher_backbone_weights", "student_backbone_weights"):
            path = getattr(self, name)
            if path is not None and not os.path.isfile(path):
                raise ConfigError(f"--{name.replace('_', '-')}: no such file {path!r}")
        if not self.methods:
            raise ConfigError("--methods: name at least one student")


def _official(name: str, student: str, lr: float, batch: int, dataset: Optional[str] = "voc2012") -> dict:
    """The official script `name`: its TaT setting, lr and batch; DeepLabV3+ at output stride 16 (ASPP 6/12/18,
    256 channels), ResNet-101 teacher, SGD Nesterov with x10 on ASPP/decoder, cosine, 100 epochs, crop 513."""
    return dict(**({"dataset": dataset} if dataset else {}), tat_config=name, teacher_backbone="resnet101",
                student_backbone=student, teacher_decoder_channels=256, student_decoder_channels=256,
                aspp_rates=(6, 12, 18), optimizer="sgd", lr=lr, head_lr_factor=10.0, lr_schedule="cosine",
                student_epochs=100, teacher_epochs=100, batch_size=batch, crop_size=513)


PRESETS = {
    "default": {},
    "voc-resnet18": _official("voc_resnet18", "resnet18", 0.007, 16),
    "voc-mobilenet": _official("voc_mobilenet", "mobilenet_v2", 0.004, 12),
    # COCO-Stuff-10k has no loader here: these two set the official COCO-Stuff TaT settings and optimiser only
    "cocostuff-resnet18": _official("cocostuff_resnet18", "resnet18", 0.01, 16, dataset=None),
    "cocostuff-mobilenet": _official("cocostuff_mobilenet", "mobilenet_v2", 0.007, 12, dataset=None),
    "smoke": dict(canvas=dict(size=16, digit_sizes=(6, 10), max_digits=2), train_samples=64, test_samples=32,
                  teacher_backbone="cnn-4-4-4-8", student_backbone="cnn-4-4-4-4", teacher_decoder_channels=8,
                  student_decoder_channels=4, grid=(2, 2), groups=2, anchor_grid=(2, 2), teacher_epochs=1,
                  student_epochs=1, batch_size=16),
}


def reference_hierarchical(head: HierarchicalTaTLoss, student, teacher):
    """HierarchicalTaTLoss written out with fastkd.reference (official regroupings, materialised softmax)."""
    maps = head.embed(student, teacher)
    return head.alpha * reference.hierarchical_tat_loss(*maps, head.grid, head.groups, head.anchor_grid,
                                                        head.beta, head.gamma, head.scale)


def load_data(cfg: TaTSegConfig) -> dict:
    if cfg.dataset == "canvases":
        return {"train": DigitSegmentation("train", cfg.train_samples, cfg.canvas, cfg.seed),
                "test": DigitSegmentation("test", cfg.test_samples, cfg.canvas, cfg.seed)}
    try:
        train = (VOCTrainAug(cfg.data_root, cfg.sbd_root, cfg.crop_size) if cfg.sbd_root else
                 VOCSegmentation2012(cfg.data_root, "train", cfg.crop_size, augment=True))
        return {"train": train, "test": VOCSegmentation2012(cfg.data_root, "val")}
    except (FileNotFoundError, ValueError) as error:
        raise ConfigError(f"--dataset {cfg.dataset}: {error}") from None


def backbone_state(state: dict) -> dict:
    """A whole torchvision ResNet or MobileNetV2 state_dict (e.g. the ImageNet weights file) cut to the backbone
    that build_backbone makes (its classifier dropped); any other state_dict as it is."""
    if "conv1.weight" in state and "fc.weight" in state:
        return {k.removeprefix("backbone."): v for k, v in from_torchvision_resnet(state).items()
                if k.startswith("backbone.")}
    if any(k.startswith("features.") for k in state) and any(k.startswith("classifier.") for k in state):
        return {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}
    return state


def build_net(role: str, cfg: TaTSegConfig, dataset) -> DeepLabV3Plus:
    weights = getattr(cfg, f"{role}_backbone_weights")
    state = backbone_state(recipe.load_state_dict(weights, f"--{role}-backbone-weights")) if weights else None
    backbone = getattr(cfg, f"{role}_backbone")
    width = getattr(cfg, f"{role}_decoder_channels")
    try:
        return DeepLabV3Plus(backbone, dataset.num_classes, dataset.in_channels, aspp_channels=width,
                             decoder_channels=width, low_channels=min(48, max(width // 2, 4)),
                             rates=cfg.aspp_rates, backbone_weights=state)
    except RuntimeError as error:  # load_state_dict: missing, unexpected or mis-shaped keys
        raise ConfigError(f"--{role}-backbone-weights {weights} does not fit --{role}-backbone {backbone} "
                          f"({str(error).splitlines()[0]})") from None


def build_student(method: str, cfg: TaTSegConfig, dataset) -> recipe.StudentWithHead:
    net = build_net("student", cfg, dataset)
    patch, anchor = METHODS[method]
    head = None
    if patch or anchor:
        settings = cfg.tat_settings()
        settings["beta"] = settings["beta"] if patch else 0.0
        settings["gamma"] = settings["gamma"] if anchor else 0.0
        head = HierarchicalTaTLoss(net.channels, cfg.teacher_decoder_channels, **settings, scale=cfg.tat_scale,
                                   per_image_bn=cfg.embed_bn == "per-image")
    return recipe.StudentWithHead(net, head, reference_hierarchical, cfg.loss_impl)


def make_step(method: str, cfg: TaTSegConfig, teacher: Optional[nn.Module], device: torch.device,
              ignore_index: int = 255):
    """step(model, batch, epoch) -> {"ce": ..., "tat": ...}: CE and the (alpha-weighted) TaT terms. A batch is
    (images, masks) or, from WithTeacherFeatures, (images, masks, the teacher's features): then no teacher pass."""
    distil = any(METHODS[method])

    def step(model, batch, epoch):
        images, masks = batch[:2]
        teacher_feature = batch[2] if len(batch) > 2 else None
        if distil and teacher_feature is None:
            teacher_feature = teacher_features(teacher, images, cfg, device)
        with autocast(cfg, device):
            outputs = model(images, teacher_feature) if distil else model(images)
        terms = {"ce": F.cross_entropy(recipe.full_precision(outputs[0])[0], masks, ignore_index=ignore_index)}
        if distil:
            terms["tat"] = min(1.0, (epoch + 1) / (cfg.tat_warmup_epochs + 1)) * outputs[2]
        return terms

    return step


def teacher_features(teacher: nn.Module, images, cfg: TaTSegConfig, device: torch.device):
    """The distilled feature (B, C, H/4, W/4) of the frozen teacher."""
    with torch.no_grad(), autocast(cfg, device):
        return teacher(images)[1]


def student_data(data: dict, teacher: nn.Module, cfg: TaTSegConfig, device: torch.device) -> dict:
    """`data` for the students: the built-in canvases (no augmentation) carry the teacher's features, computed
    once; real datasets (random crops) as they are, the teacher running in every step."""
    if cfg.dataset != "canvases" or not any(any(METHODS[m]) for m in cfg.methods):
        return data
    feature_of = functools.partial(teacher_features, cfg=cfg, device=device)
    return {**data, "train": WithTeacherFeatures(data["train"], teacher, feature_of, device)}


def evaluate(model, dataset, cfg: TaTSegConfig, ctx: distributed.Context) -> Dict[str, float]:
    """mIoU, pixel accuracy and per-class IoU (%) from the confusion matrix summed over every rank's shard."""
    num_classes = dataset.num_classes
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long, device=ctx.device)
    shard = torch.utils.data.Subset(dataset, range(ctx.rank, len(dataset), ctx.world_size))
    batch_size = 64 if cfg.dataset == "canvases" else 1  # VOC images differ in size
    for images, masks in torch.utils.data.DataLoader(shard, batch_size=batch_size, num_workers=_workers(cfg)):
        with autocast(cfg, ctx.device):
            logits = model(images.to(ctx.device))[0]
        confusion += metrics.confusion_matrix(logits.argmax(1), masks.to(ctx.device), num_classes,
                                              dataset.ignore_index)
    if ctx.distributed:
        torch.distributed.all_reduce(confusion)
    return metrics.segmentation_scores(confusion.cpu())


def _workers(cfg: TaTSegConfig) -> int:
    return 0 if cfg.dataset == "canvases" else cfg.num_workers


def make_optimizer(cfg: TaTSegConfig, model: nn.Module):
    """Backbone at --lr, everything else (ASPP, decoder, classifier, TaT head) at --lr x --head-lr-factor."""
    net = model.net if isinstance(model, recipe.StudentWithHead) else model
    backbone = {id(p) for part in (net.low, net.deep) for p in part.parameters()}
    groups = [{"params": [p for p in model.parameters() if id(p) in backbone], "lr": cfg.lr},
              {"params": [p for p in model.parameters() if id(p) not in backbone], "lr": cfg.lr * cfg.head_lr_factor}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _train(name: str, model: nn.Module, epochs: int, step, cfg: TaTSegConfig, data, ctx):
    model = model.to(ctx.device)
    optimizer = make_optimizer(cfg, model)
    steps = engine.steps_per_epoch(len(data["train"]), cfg.batch_size, ctx, cfg.accumulate_steps)
    peaks = [group["lr"] for group in optimizer.param_groups]
    scheduler = lr_schedule(cfg.lr_schedule, optimizer, epochs * steps, peak_lr=peaks)
    history = engine.train(model, optimizer, data["train"], epochs=epochs, step=step, scheduler=scheduler,
                           scaler=recipe.grad_scaler(cfg, ctx.device),
                           evaluate=lambda m: evaluate(m, data["test"], cfg, ctx),
                           run_dir=os.path.join(cfg.out_dir, name), ctx=ctx, name=name, num_workers=_workers(cfg),
                           config=results_fields(cfg), **recipe.loop_options(cfg))
    return model, history


def run(cfg: TaTSegConfig) -> dict:
    """Train (or load) the teacher and every student in cfg.methods; return {name: history} and write
    out_dir/results.json, results.md and results.png."""
    with recipe.session(cfg) as ctx:
        data = load_data(cfg)
        recipe.check_batches(cfg, len(data["train"]), ctx)
        torch.manual_seed(cfg.seed)
        teacher = build_net("teacher", cfg, data["train"])
        if cfg.teacher_checkpoint:
            teacher.load_state_dict(recipe.load_state_dict(cfg.teacher_checkpoint, "--teacher-checkpoint"))
            teacher = teacher.to(ctx.device)
            teacher_history = [{"epoch": 0, **evaluate(teacher.eval(), data["test"], cfg, ctx)}]
        else:
            teacher, teacher_history = _train("teacher", teacher, cfg.teacher_epochs,
                                              make_step("vanilla", cfg, None, ctx.device), cfg, data, ctx)
        recipe.freeze(teacher)
        histories = {"teacher": teacher_history}
        students = student_data(data, teacher, cfg, ctx.device)
        for method in cfg.methods:
            torch.manual_seed(cfg.seed)  # every student starts from the same weights
            student = build_student(method, cfg, data["train"])
            _, histories[method] = _train(method, student, cfg.student_epochs,
                                          make_step(method, cfg, teacher, ctx.device), cfg, students, ctx)
        if ctx.is_main:
            report.write(cfg.out_dir, config.to_dict(cfg), histories, results_table(histories), "mIoU")
    return histories


COLUMNS = {"mIoU": "mIoU", "pixel_acc": "pixel accuracy"}


def results_table(histories: dict) -> str:
    return report.results_table(histories, COLUMNS, "mIoU")


def config_with(**overrides) -> TaTSegConfig:
    """TaTSegConfig with top-level overrides (None values ignored)."""
    return replace(TaTSegConfig(), **{k: v for k, v in overrides.items() if v is not None})


RECIPE = recipe.Recipe(name="tat-seg", help="TaT segmentation distillation, DeepLabV3+ (built-in digit canvases "
                       "by default)", config=TaTSegConfig, run=run, table=results_table, metric="mIoU",
                       title="TaT segmentation on the {dataset} test set", presets=PRESETS)
