"""MLTr reference training: MITr (fastkd.models.mitr) trained for multi-label classification, and the paper's
ablation ladder (Table 5) as the table: window attention only -> + relative position bias -> + shifted windows
-> + cross-window attention -> + arc sigmoid -> + object-aware token loss (the full MITr).

Loss per batch (the paper's Eq. 18 summed over the images): ASL_sum(z, y) + count_weight * OTL_sum(count logits,
number of distinct classes), OTL only on the rung with the token. Adam with a per-step OneCycle schedule, as the
paper (its lr 1e-4 is for fine-tuning from ImageNet-22k; from scratch on the built-in canvases the default is
higher). No official code exists; the model's open decisions are listed in fastkd/models/mitr.py.
"""
import os
from dataclasses import dataclass, replace
from typing import Dict, Optional, Tuple

import torch

from fastkd import metrics
from fastkd.data import CanvasConfig
from fastkd.data.digit_grid import check_grid
from fastkd.functional import asymmetric_loss, count_targets, object_count_loss
from fastkd.models.mitr import VARIANTS, MITr, variant_spec
from fastkd.recipes import config, distributed, engine, recipe, report
from fastkd.recipes.config import ConfigError, option, results_fields
from fastkd.recipes.l2d import MultiLabelDataConfig, load_data
from fastkd.recipes.recipe import autocast
from fastkd.recipes.schedules import lr_schedule

SWITCHES = ("position_bias", "shift", "cross_window", "arc_sigmoid", "count_token")
LADDER = {  # rung -> the model switches on (each rung adds one part to the one above it)
    "window": (),
    "pos-bias": SWITCHES[:1],
    "shift": SWITCHES[:2],
    "cross-window": SWITCHES[:3],
    "arc-sigmoid": SWITCHES[:4],
    "count-token": SWITCHES,  # the full MITr
}


@dataclass
class MLTrConfig(MultiLabelDataConfig):
    out_dir: str = option("runs/mltr", "where runs, checkpoints, metrics, table and plot go", affects_results=False)
    # 48 x 48 canvases with the digits on a 2 x 2 grid of cells (digit_grid.py): MITr-tiny learns which digits
    # are present from 18-24 px digits on slots in a few hundred steps, not from L2D's randomly placed ones (README)
    canvas: CanvasConfig = option(CanvasConfig(size=48, digit_sizes=(18, 24), grid=2), "built-in canvases")
    train_samples: int = option(4000, "built-in canvases for training", check=">=1")
    test_samples: int = option(500, "built-in canvases for testing", check=">=1")
    variant: str = option("tiny", "MITr variant: s, m, l (the paper's Table 1) or tiny (CPU)", choices=VARIANTS)
    patch: Optional[int] = option(4, "patch side P of the projection (s, m, l: 4 as the paper; none = the variant's, "
                                  "tiny: 2, which learns the canvases too slowly: README)", check=">=1")
    encoder_weights: Optional[str] = option(None, "start the encoder from this local state_dict (e.g. an "
                                            "ImageNet-trained MITr encoder; a last.pt of this recipe works too)")
    epochs: int = option(5, "epochs of each rung", check=">=1")
    lr: float = option(2e-3, "peak learning rate (Adam; the paper fine-tunes with 1e-4)", check=">0")
    weight_decay: float = option(0.0, "Adam's (L2) weight decay", check=">=0")
    lr_schedule: str = option("onecycle", "onecycle (per step, 20% warm-up, as the paper and ASL) or constant",
                              choices=("onecycle", "constant"))
    gamma_pos: float = option(0.0, "ASL focusing of positives (paper 0)", check=">=0")
    gamma_neg: float = option(4.0, "ASL focusing of negatives (paper 4)", check=">=0")
    clip: float = option(0.05, "ASL probability margin m of negatives (paper 0.05)", check=">=0")
    arc_scale: float = option(8.0, "arc-sigmoid scale s (paper 8)", check=">0")
    cross_heads: int = option(1, "heads of cross-window attention (must divide window^2)", check=">=1")
    # 0.1, not the paper's 1: its cross-entropy per image against ASL summed over 10 classes (the paper: 80) swamps
    # the class loss in the first epoch here and the encoder learns to count, not which digits (README)
    count_weight: float = option(0.1, "weight of the object-aware token loss (paper 1)", check=">=0")
    rungs: Tuple[str, ...] = option(tuple(LADDER), "comma-separated rungs of the ablation ladder to train",
                                    choices=LADDER, affects_results=False)

    def check(self) -> None:
        if self.dataset != "digits" and not (self.data_root and os.path.isdir(self.data_root)):
            raise ConfigError(f"--dataset {self.dataset} needs --data-root, the directory holding it "
                              f"(got {self.data_root!r})")
        spec = VARIANTS[self.variant]
        if (spec.window * spec.window) % self.cross_heads:
            raise ConfigError(f"--cross-heads {self.cross_heads} must divide window^2 = {spec.window ** 2} of "
                              f"variant {self.variant}")
        try:
            self.spec()
        except ValueError as error:
            raise ConfigError(f"--image-size / --canvas-size / --patch: {error}") from None
        try:
            check_grid(self.canvas)
        except ValueError as error:
            raise ConfigError(f"--canvas-grid / --canvas-max-digits / --canvas-jitter: {error}") from None
        if self.encoder_weights is not None and not os.path.isfile(self.encoder_weights):
            raise ConfigError(f"--encoder-weights: no such file {self.encoder_weights!r}")
        if not self.rungs:
            raise ConfigError("--rungs: name at least one rung")

    def input_size(self) -> int:
        return self.canvas.size if self.dataset == "digits" else self.image_size

    def spec(self):
        """The MITrSpec of --variant for the input size, with --patch."""
        return variant_spec(self.variant, self.input_size(), self.patch)


PRESETS = {
    "default": {},
    # 4x the default's steps, on twice the canvases (untimed: about 40 minutes of CPU time)
    "long": dict(train_samples=8000, epochs=10),
    # the paper's MITr-s setting on a real dataset (give --dataset and --data-root; --encoder-weights for a start
    # from ImageNet, as the paper's 22k start): 224 px, Adam 1e-4, OneCycle, 200 epochs
    "paper-s": dict(variant="s", image_size=224, lr=1e-4, epochs=200, count_weight=1.0),
    # seconds on a CPU: small canvases, few samples, one epoch per rung; to check that everything runs
    "smoke": dict(canvas=dict(size=32, digit_sizes=(12, 16), max_digits=3), train_samples=64, test_samples=32,
                  epochs=1, batch_size=16),
}


def build_model(rung: str, cfg: MLTrConfig, num_classes: int, in_channels: int) -> MITr:
    """MITr of cfg.variant with the switches of `rung` on, built for cfg's input size."""
    switches = {name: name in LADDER[rung] for name in SWITCHES}
    model = MITr(cfg.spec(), num_classes, in_channels,
                 cross_heads=cfg.cross_heads, arc_scale=cfg.arc_scale, **switches)
    if cfg.encoder_weights:
        state = recipe.load_state_dict(cfg.encoder_weights, "--encoder-weights")
        encoder = {k.removeprefix("encoder."): v for k, v in state.items() if not k.startswith(
            ("classifier.", "count_"))}
        # not strict: a rung without some part (e.g. cross-window attention) takes the rest of a full encoder
        loaded = model.encoder.load_state_dict(encoder, strict=False)
        if len(loaded.missing_keys) == len(model.encoder.state_dict()):
            raise ConfigError(f"--encoder-weights {cfg.encoder_weights}: no key matches a MITr-{cfg.variant} "
                              f"encoder (expected keys such as 'patch_embed.weight' or 'encoder.patch_embed.weight')")
    return model


def make_step(cfg: MLTrConfig, device: torch.device):
    """step(model, batch, epoch) -> {"asl": ..., "count": ...} (count only for a model with the token)."""
    def step(model, batch, epoch):
        images, targets = batch
        with autocast(cfg, device):
            logits, count_logits = model(images)
        logits, = recipe.full_precision(logits)
        terms = {"asl": asymmetric_loss(logits, targets, gamma_pos=cfg.gamma_pos, gamma_neg=cfg.gamma_neg,
                                        clip=cfg.clip)}
        if count_logits is not None:
            terms["count"] = cfg.count_weight * object_count_loss(*recipe.full_precision(count_logits), targets)
        return terms

    return step


def evaluate(model, dataset, cfg: MLTrConfig, ctx: distributed.Context) -> Dict[str, float]:
    """mAP (classes with positives), per-class AP, CP, CR, CF1 (from CP, CR), CF1_mean, OP, OR, OF1 at 0.5, and
    the token's count accuracy, over `dataset` (each rank its shard, gathered)."""
    def scores(model, images):
        with autocast(cfg, ctx.device):
            logits, count_logits = model(images)
        counts = (count_logits.float().argmax(1, keepdim=True).float() if count_logits is not None
                  else torch.full_like(logits[:, :1], -1.0, dtype=torch.float32))
        return torch.cat([torch.sigmoid(logits.float()), counts], 1)

    outputs, targets = recipe.predict(model, dataset, ctx, scores, num_workers=_workers(cfg))
    probabilities, counts = outputs[:, :-1], outputs[:, -1]
    per_class_ap = metrics.average_precision(probabilities, targets)
    m_ap, skipped = metrics.mean_over_classes_with_positives(per_class_ap, targets)
    result = {"mAP": 100 * m_ap, "classes_without_positives": skipped,
              "AP_per_class": [None if ap != ap else 100 * ap for ap in per_class_ap.tolist()]}
    result.update({k: 100 * v for k, v in metrics.threshold_scores(probabilities, targets).items()})
    if (counts >= 0).all():
        result["count_accuracy"] = 100 * (counts == count_targets(targets)).double().mean().item()
    return result


def _workers(cfg: MLTrConfig) -> int:
    return 0 if cfg.dataset == "digits" else cfg.num_workers  # canvases are in memory already


def train_rung(rung: str, cfg: MLTrConfig, data, ctx):
    torch.manual_seed(cfg.seed)  # every rung starts from the same random state
    model = build_model(rung, cfg, data["train"].num_classes, data["train"].in_channels).to(ctx.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = engine.steps_per_epoch(len(data["train"]), cfg.batch_size, ctx, cfg.accumulate_steps)
    scheduler = lr_schedule(cfg.lr_schedule, optimizer, cfg.epochs * steps, peak_lr=cfg.lr)
    history = engine.train(model, optimizer, data["train"], epochs=cfg.epochs, step=make_step(cfg, ctx.device),
                           scheduler=scheduler, scaler=recipe.grad_scaler(cfg, ctx.device),
                           evaluate=lambda m: evaluate(m, data["test"], cfg, ctx),
                           run_dir=os.path.join(cfg.out_dir, rung), ctx=ctx, name=rung, num_workers=_workers(cfg),
                           config=results_fields(cfg), **recipe.loop_options(cfg))
    return model, history


def run(cfg: MLTrConfig) -> dict:
    """Train every rung of cfg.rungs; return {rung: history} and write out_dir/results.json, results.md (the
    ladder) and results.png."""
    with recipe.session(cfg) as ctx:
        data = load_data(cfg)
        recipe.check_batches(cfg, len(data["train"]), ctx)
        histories = {}
        for rung in cfg.rungs:
            _, histories[rung] = train_rung(rung, cfg, data, ctx)
        if ctx.is_main:
            report.write(cfg.out_dir, config.to_dict(cfg), histories, results_table(histories), "mAP")
    return histories


COLUMNS = ("mAP", "CP", "CR", "CF1", "OP", "OR", "OF1")


def results_table(histories: dict) -> str:
    """| rung | mAP | CP | CR | CF1 | OP | OR | OF1 | mAP change |, the change against the rung above."""
    lines = ["| rung | " + " | ".join(COLUMNS) + " | mAP vs the rung above |", "|---|" + "---|" * (len(COLUMNS) + 1)]
    previous = None
    for i, (rung, history) in enumerate(histories.items()):
        last = report.last_with(history, "mAP")
        cells = ["nan" if last.get(k) is None else f"{last[k]:.1f}" for k in COLUMNS]
        current = last.get("mAP")
        change = "-" if previous is None or current is None else f"{current - previous:+.1f}"
        lines.append(f"| {'' if i == 0 else '+ '}{rung} | " + " | ".join(cells) + f" | {change} |")
        previous = current
    return "\n".join(lines)


def config_with(**overrides) -> MLTrConfig:
    """MLTrConfig with top-level overrides (None values ignored)."""
    return replace(MLTrConfig(), **{k: v for k, v in overrides.items() if v is not None})


RECIPE = recipe.Recipe(name="mltr", help="MITr multi-label training and the paper's ablation ladder (built-in "
                       "digit canvases by default)", config=MLTrConfig, run=run, table=results_table, metric="mAP",
                       title="MITr ablation ladder on the {dataset} test set", presets=PRESETS)
