"""LGD (label-guided self-distillation for detection): the label encoder, appearance encoder, relation adapter,
knowledge mapper, the teacher that ties them together, the student adapter and the distillation loss."""
from fastkd.models.lgd.distill import StudentAdapter, lgd_distillation_loss
from fastkd.models.lgd.label_encoder import LabelEncoder, box_descriptors, segment_max
from fastkd.models.lgd.mapper import AppearanceEncoder, KnowledgeMapper
from fastkd.models.lgd.relation import RelationAdapter, same_image_mask
from fastkd.models.lgd.teacher import LabelGuidedTeacher

__all__ = ["AppearanceEncoder", "KnowledgeMapper", "LabelEncoder", "LabelGuidedTeacher", "RelationAdapter",
           "StudentAdapter", "box_descriptors", "lgd_distillation_loss", "same_image_mask", "segment_max"]
from fastkd.models.lgd.detector import LGDDetector  # noqa: E402  (after the parts it is made of)

__all__ += ["LGDDetector"]
