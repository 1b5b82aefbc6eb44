"""Zero-shot accuracy on a held-out labelled image folder, measured during training (rank 0 only).

The images are decoded and transformed once; each check embeds them with the current weights, builds the
prompt-ensemble classifier from the class names and returns top-1 accuracy. Small by design (a few hundred
images): it is a learning signal in metrics.csv, not the evaluation job.
"""

from __future__ import annotations

import torch
from PIL import Image

from clip_model import Tokenizer, image_transform
from clip_model.zero_shot import build_zero_shot_classifier, get_templates, predict
from pipelines.evaluation.data import image_folder


class ZeroShotCheck:
    def __init__(
        self,
        folder: str,
        tokenizer: Tokenizer,
        image_size: int,
        templates: str = "default",
        limit_per_class: int = 0,
        batch_size: int = 128,
    ):
        eval_set = image_folder(folder, limit_per_class=limit_per_class)
        transform = image_transform(image_size)
        units = eval_set.units
        self.images = torch.stack([transform(Image.open(u["path"])) for u in units])
        self.labels = torch.tensor([u["label"] for u in units])
        self.class_names = eval_set.class_names
        self.templates = get_templates(templates)
        self.tokenizer = tokenizer
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module, device: torch.device) -> float:
        """Top-1 accuracy of `model` (a clip_model.CLIP); restores its train/eval mode."""
        was_training = model.training
        model.eval()
        try:
            weights = build_zero_shot_classifier(
                model, self.tokenizer, self.class_names, self.templates, device=device
            )
            features = torch.cat(
                [
                    model.encode_image(self.images[i : i + self.batch_size].to(device)).float()
                    for i in range(0, len(self.images), self.batch_size)
                ]
            )
            top1 = predict(features, weights)[:, 0].cpu()
        finally:
            model.train(was_training)
        return (top1 == self.labels).float().mean().item()
