"""A frozen teacher's feature of every training sample, computed once: for data without random augmentation
(the built-in canvases), a distilling student's step then reads the teacher's feature with its batch instead of
running the teacher's forward pass every step (on the CPU recipes that forward is a quarter of a TaT step).

WithTeacherFeatures(dataset, teacher, feature_of)[i] = (*dataset[i], feature_of(teacher, images)[i]), computed in
batches under no_grad with the teacher as it is (frozen, eval mode: a sample's feature does not depend on the
others in its batch), kept on the CPU in the teacher's output dtype.
"""
from typing import Callable

import torch


class WithTeacherFeatures(torch.utils.data.Dataset):
    """`dataset`'s (input, target, ...) items with the teacher's feature of the input appended."""

    def __init__(self, dataset, teacher: torch.nn.Module, feature_of: Callable, device: torch.device,
                 batch_size: int = 64):
        if teacher.training:
            raise ValueError("teacher must be in eval mode (recipe.freeze): in train mode its BN makes a sample's "
                             "feature depend on its batch")
        self.dataset = dataset
        features = []
        with torch.no_grad():
            for batch in torch.utils.data.DataLoader(dataset, batch_size=batch_size):
                features.append(feature_of(teacher, batch[0].to(device)).cpu())
        self.features = torch.cat(features)
        for name in ("in_channels", "num_classes", "ignore_index", "class_names"):
            if hasattr(dataset, name):
                setattr(self, name, getattr(dataset, name))

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        return (*self.dataset[index], self.features[index])
