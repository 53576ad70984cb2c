"""L2D reference training: a teacher, then students without and with multi-label distillation
(vanilla, MLD, MLD+CD, MLD+ID, full L2D), evaluated on held-out data; the paper's ablation as a table.

Student loss (official form): BCE_sum(z_s, y) + lambda_mld * MLD(z_s, z_t)
                              + lambda_cd * CD(e_s, e_t, y) + lambda_id * ID(e_s, e_t, y)
with the teacher frozen (eval mode, no gradient) and its outputs cast to float32, as the official recipe.
"""
import os
from dataclasses import dataclass, replace
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

import fastkd
from fastkd import metrics, reference
from fastkd.data import CanvasConfig, DigitCanvases, open_dataset
from fastkd.models import LabelWiseEmbeddingHead, MultiLabelNet, build_backbone, check_backbone_name
from fastkd.recipes import config, distributed, engine, recipe, report
from fastkd.recipes.config import ConfigError, option, results_fields
from fastkd.recipes.recipe import RunConfig, autocast
from fastkd.recipes.schedules import lr_schedule

METHODS = {  # method -> which distillation terms it uses (MLD, CD, ID)
    "vanilla": (False, False, False),
    "mld": (True, False, False),
    "mld+cd": (True, True, False),
    "mld+id": (True, False, True),
    "l2d": (True, True, True),
}
REAL_SPLITS = {"voc2007": ("trainval", "test"), "coco2014": ("train", "val"), "image-list": ("train", "test")}


@dataclass
class MultiLabelDataConfig(RunConfig):
    """The multi-label data options of the l2d and mltr recipes: built-in canvases or a real dataset."""
    dataset: str = option("digits", "digits (built in) or a real dataset under --data-root",
                          choices=("digits", *REAL_SPLITS))
    data_root: Optional[str] = option(None, "voc2007: the folder holding VOCdevkit; coco2014: the folder holding "
                                      "annotations/ and train2014/ val2014/; image-list: the folder holding "
                                      "train.txt and test.txt", affects_results=False)
    image_size: int = option(224, "real datasets: square input side", check=">=8")
    canvas: CanvasConfig = option(CanvasConfig(), "built-in canvases")
    train_samples: int = option(2000, "built-in canvases for training", check=">=1")
    test_samples: int = option(1000, "built-in canvases for testing", check=">=1")


@dataclass
class L2DConfig(MultiLabelDataConfig):
    out_dir: str = option("runs/l2d", "where runs, checkpoints, metrics, table and plot go", affects_results=False)
    teacher_backbone: str = option("cnn-16-32-64", "cnn-W1-W2-..., resnet18/34/50/101, mobilenet_v2 or "
                                  "mitr-tiny/s/m/l (MITr's encoder)")
    student_backbone: str = option("cnn-8-16-32", "as --teacher-backbone")
    teacher_backbone_weights: Optional[str] = option(None, "local state_dict file for the teacher's backbone")
    student_backbone_weights: Optional[str] = option(None, "local state_dict file for the students' backbone")
    teacher_checkpoint: Optional[str] = option(None, "use this trained teacher (a last.pt or a state_dict) "
                                               "instead of training one")
    embed_dim: int = option(64, "label-wise embedding size of the ML-Decoder-style head", check=">=1")
    heads: int = option(4, "attention heads of the head (must divide --embed-dim)", check=">=1")
    ffn_dim: int = option(128, "feed-forward width of the head", check=">=1")
    teacher_epochs: int = option(12, "the teacher trains longer: a strong teacher, students on a budget",
                                 check=">=1")
    student_epochs: int = option(6, "epochs of each student", check=">=1")
    lr: float = option(2e-3, "peak learning rate (Adam)", check=">0")
    lr_schedule: str = option("onecycle", "onecycle (per step, 20% warm-up, as ML-Decoder/ASL) or constant",
                              choices=("onecycle", "constant"))
    # official weights are 10 / 100 / 1000 (preset "official-weights"). MLD: 64 gained most of 10 / 64 / 320
    # (seed 0; with batchmean and batch 32, MLD's logit gradient then weighs twice BCE's). LED: the official
    # weights collapse a small randomly initialised student (shared/design/observations.md): scaled down, on
    # after a warm-up.
    lambda_mld: float = option(64.0, "weight of MLD (official: 10)", check=">=0")
    mld_temperature: float = option(1.0, "MLD temperature (1 = official; the loss is scaled by T^2)", check=">0")
    lambda_cd: float = option(3.0, "weight of LED-CD (official: 100)", check=">=0")
    lambda_id: float = option(30.0, "weight of LED-ID (official: 1000)", check=">=0")
    led_warmup_epochs: int = option(2, "epochs before the LED terms switch on", check=">=0")
    mean_floor: float = option(0.0, "floor on LED's normalising means (0 = official)", check=">=0")
    loss_impl: str = option("fastkd", "fastkd ops or the plain reference formulas", choices=("fastkd", "reference"))
    methods: Tuple[str, ...] = option(tuple(METHODS), "comma-separated students to train", choices=METHODS,
                                      affects_results=False)

    def check(self) -> None:
        if self.dataset != "digits" and not (self.data_root and os.path.isdir(self.data_root)):
            raise ConfigError(f"--dataset {self.dataset} needs --data-root, the directory holding it "
                              f"(got {self.data_root!r})")
        if self.embed_dim % self.heads:
            raise ConfigError(f"--heads {self.heads} must divide --embed-dim {self.embed_dim}")
        for name in ("teacher_backbone", "student_backbone"):
            try:
                check_backbone_name(getattr(self, name))
            except ValueError as error:
                raise ConfigError(f"--{name.replace('_', '-')}: {error}") from None
        if not self.methods:
            raise ConfigError("--methods: name at least one student")


PRESETS = {
    "default": {},
    # the paper's loss weights, LED from the first step (they collapse the small built-in student: see README)
    "official-weights": dict(lambda_mld=10.0, lambda_cd=100.0, lambda_id=1000.0, led_warmup_epochs=0),
    # seconds on a CPU: tiny canvases and networks, one epoch each; to check that everything runs
    "smoke": dict(canvas=dict(size=24, digit_sizes=(8, 12), max_digits=3), train_samples=128, test_samples=64,
                  teacher_backbone="cnn-4-8", student_backbone="cnn-4", embed_dim=16, heads=2, ffn_dim=32,
                  teacher_epochs=1, student_epochs=1, led_warmup_epochs=0),
}


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
                weights: Optional[dict] = None, image_size: Optional[int] = None) -> MultiLabelNet:
    """Backbone and label-wise head; image_size: the input side (MITr backbones are built for it)."""
    net, channels = build_backbone(backbone, in_channels, weights, image_size)
    return MultiLabelNet(net, LabelWiseEmbeddingHead(channels, num_classes, cfg.embed_dim, cfg.heads, cfg.ffn_dim))


def model_for(backbone: str, cfg: L2DConfig, dataset, weights: Optional[dict] = None) -> MultiLabelNet:
    """build_model with the dataset's number of classes, image channels and image size."""
    return build_model(backbone, cfg, dataset.num_classes, dataset.in_channels, weights, dataset[0][0].shape[-1])


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


def make_step(method: str, cfg: L2DConfig, teacher: Optional[torch.nn.Module], device: torch.device,
              process_group=None):
    """step(model, batch, epoch) -> {"bce": ..., "mld": ..., "cd": ..., "id": ...}: the weighted loss terms
    `method` uses (LED's after its warm-up), summed by the engine."""
    use_mld, use_cd, use_id = METHODS[method]
    mld, cd, id_ = distillation_terms(cfg, process_group)

    def step(model, batch, epoch):
        images, targets = batch
        with autocast(cfg, device):
            logits, embeddings = model(images)
        logits, embeddings = recipe.full_precision(logits, embeddings)
        terms = {"bce": F.binary_cross_entropy_with_logits(logits, targets, reduction="sum")}
        if teacher is None or not (use_mld or use_cd or use_id):
            return terms
        with torch.no_grad(), autocast(cfg, device):
            t_logits, t_embeddings = teacher(images)
        t_logits, t_embeddings = recipe.full_precision(t_logits, t_embeddings)
        if use_mld:
            terms["mld"] = cfg.lambda_mld * mld(logits, t_logits)
        if epoch >= cfg.led_warmup_epochs:
            if use_cd:
                terms["cd"] = cfg.lambda_cd * cd(embeddings, t_embeddings, targets)
            if use_id:
                terms["id"] = cfg.lambda_id * id_(embeddings, t_embeddings, targets)
        return terms

    return step


def evaluate(model, dataset, cfg: L2DConfig, ctx: distributed.Context) -> Dict[str, float]:
    """mAP, per-class AP (None for a class without positives), OF1 and CF1 (both conventions) over `dataset`,
    each rank scoring its own shard, gathered. Non-finite scores give NaN metrics."""
    def scores(model, images):
        with autocast(cfg, ctx.device):
            logits, _ = model(images)
        return torch.sigmoid(logits.float())

    probabilities, targets = recipe.predict(model, dataset, ctx, scores, num_workers=_workers(cfg))
    per_class_ap = metrics.average_precision(probabilities, targets)
    m_ap, skipped = metrics.mean_over_classes_with_positives(per_class_ap, targets)
    per_class = [None if ap != ap else 100 * ap for ap in per_class_ap.tolist()]
    result = {"mAP": 100 * m_ap, "classes_without_positives": skipped, "AP_per_class": per_class}
    result.update({k: 100 * v for k, v in metrics.threshold_scores(probabilities, targets).items()
                   if k in ("OF1", "CF1", "CF1_mean")})
    return result


def _workers(cfg: L2DConfig) -> int:
    return 0 if cfg.dataset == "digits" else cfg.num_workers  # canvases are in memory already


def train_model(name: str, backbone: str, epochs: int, cfg: L2DConfig, data, ctx, teacher=None,
                weights: Optional[str] = None):
    torch.manual_seed(cfg.seed)
    role = "teacher" if teacher is None else "student"  # every student is given the teacher, vanilla too
    state = recipe.load_state_dict(weights, f"--{role}-backbone-weights") if weights else None
    model = model_for(backbone, cfg, data["train"], state).to(ctx.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    steps = engine.steps_per_epoch(len(data["train"]), cfg.batch_size, ctx, cfg.accumulate_steps)
    scheduler = lr_schedule(cfg.lr_schedule, optimizer, epochs * steps, peak_lr=cfg.lr)
    method = "vanilla" if teacher is None else name
    history = engine.train(model, optimizer, data["train"], epochs=epochs,
                           step=make_step(method, cfg, teacher, ctx.device, distributed.group(ctx)),
                           scheduler=scheduler, scaler=recipe.grad_scaler(cfg, ctx.device),
                           evaluate=lambda m: evaluate(m, data["test"], cfg, ctx),
                           run_dir=os.path.join(cfg.out_dir, name), ctx=ctx, name=name, num_workers=_workers(cfg),
                           config=results_fields(cfg), **recipe.loop_options(cfg))
    return model, history


def run(cfg: L2DConfig) -> dict:
    """Train the teacher and every student in cfg.methods; return {name: history} and write
    out_dir/results.json, out_dir/results.md (the table) and out_dir/results.png (curves and bars)."""
    with recipe.session(cfg) as ctx:
        data = load_data(cfg)
        recipe.check_batches(cfg, len(data["train"]), ctx)
        if cfg.teacher_checkpoint:
            teacher = model_for(cfg.teacher_backbone, cfg, data["train"]).to(ctx.device)
            teacher.load_state_dict(recipe.load_state_dict(cfg.teacher_checkpoint, "--teacher-checkpoint"))
            teacher_history = [{"epoch": 0, **evaluate(teacher.eval(), data["test"], cfg, ctx)}]
        else:
            teacher, teacher_history = train_model("teacher", cfg.teacher_backbone, cfg.teacher_epochs, cfg, data,
                                                   ctx, weights=cfg.teacher_backbone_weights)
        recipe.freeze(teacher)
        histories = {"teacher": teacher_history}
        for method in cfg.methods:
            _, histories[method] = train_model(method, cfg.student_backbone, cfg.student_epochs, cfg, data, ctx,
                                               teacher=teacher, weights=cfg.student_backbone_weights)
        if ctx.is_main:
            report.write(cfg.out_dir, config.to_dict(cfg), histories, results_table(histories), "mAP")
    return histories


COLUMNS = {"mAP": "mAP", "OF1": "OF1", "CF1": "CF1", "CF1_mean": "CF1 (mean of per-class F1)"}


def results_table(histories: dict) -> str:
    return report.results_table(histories, COLUMNS, "mAP")


def config_with(**overrides) -> L2DConfig:
    """L2DConfig with top-level overrides (None values ignored)."""
    return replace(L2DConfig(), **{k: v for k, v in overrides.items() if v is not None})


RECIPE = recipe.Recipe(name="l2d", help="L2D multi-label distillation (built-in digit canvases by default)",
                       config=L2DConfig, run=run, table=results_table, metric="mAP",
                       title="L2D ablation on the {dataset} test set", presets=PRESETS)
