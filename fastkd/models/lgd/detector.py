"""A torchvision detector trained with or without LGD, as one module (one checkpoint, one DDP wrapper).

Training forward (official LGD, per batch): the student's pyramid P; its detection losses; with LGD, the
teacher's instructive pyramid T = LabelGuidedTeacher(P, ground truth); the detection losses of the SAME head on
T ("<name>_teacher"); and the distillation mse(IN(adapter(P)), IN(T.detach())) times `distill_weight`.
`distill_student=False` detaches P in the distillation (only the adapter learns from it: the official first
30k iterations); `freeze_body=True` gives the bottom-up body no gradient (official first 20k). Evaluation is the
plain detector: the teacher and adapter exist only in training.
"""
from collections import OrderedDict
from typing import Dict, List, Optional

import torch
from torch import nn

from fastkd.models.detection import detect, detection_losses, pyramid
from fastkd.models.lgd.distill import StudentAdapter, lgd_distillation_loss
from fastkd.models.lgd.teacher import LabelGuidedTeacher


class LGDDetector(nn.Module):
    def __init__(self, detector: nn.Module, teacher: Optional[LabelGuidedTeacher] = None,
                 distill_weight: float = 1.0):
        super().__init__()
        self.detector, self.teacher, self.distill_weight = detector, teacher, distill_weight
        self.adapter = StudentAdapter(detector.backbone.out_channels) if teacher is not None else None

    def label_guided_parameters(self) -> List[nn.Parameter]:
        """The teacher's parameters (the official second optimizer); the rest (detector, adapter) is the
        student's."""
        return list(self.teacher.parameters()) if self.teacher is not None else []

    def forward(self, images: List[torch.Tensor], targets: Optional[List[dict]] = None, *,
                distill_student: bool = True, freeze_body: bool = False, instructive: bool = False):
        """Training: {loss name: tensor}; evaluation: the detector's detections (list of dicts), or with
        `instructive` (and targets) the detections of its head on the teacher's instructive levels (the official
        "eval teacher": how much the label-guided features know)."""
        if not self.training and not instructive:
            return self.detector(images)
        if targets is None:
            raise ValueError("targets are needed in training and for the instructive features (a list of dicts "
                             "with boxes and labels)")
        if instructive:
            return self.detect_instructive(images, targets)
        batch, targets = self.detector.transform(images, targets)
        features = pyramid(self.detector, batch.tensors, freeze_body)
        losses: Dict[str, torch.Tensor] = dict(detection_losses(self.detector, batch, features, targets))
        if self.teacher is None:
            return losses
        student = list(features.values())
        instructive = self.teacher(student, targets, tuple(batch.tensors.shape[-2:]))
        teacher_losses = detection_losses(self.detector, batch, OrderedDict(zip(features, instructive)), targets)
        losses.update({f"{name}_teacher": value for name, value in teacher_losses.items()})
        adapted = self.adapter(student if distill_student else [level.detach() for level in student])
        losses["distill"] = self.distill_weight * lgd_distillation_loss(adapted, instructive)
        return losses

    def detect_instructive(self, images: List[torch.Tensor], targets: List[dict]) -> list:
        if self.teacher is None:
            raise ValueError("this model has no label-guided teacher (a baseline)")
        sizes = [tuple(image.shape[-2:]) for image in images]
        batch, targets = self.detector.transform(images, targets)
        features = pyramid(self.detector, batch.tensors)
        instructive = self.teacher(list(features.values()), targets, tuple(batch.tensors.shape[-2:]))
        return detect(self.detector, batch, OrderedDict(zip(features, instructive)), sizes)
