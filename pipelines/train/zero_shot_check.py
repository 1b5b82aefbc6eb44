"""Zero-shot accuracy on a held-out labelled image folder, measured during training (rank 0 only).

The images are decoded and transformed once (unreadable ones are skipped and counted in `skipped`); each
check embeds them with the current weights, builds the prompt-ensemble classifier from the class names and
returns top-1 accuracy. Small by design (a few hundred images): it is a learning signal in metrics.csv, not
the evaluation job. The folder and the templates file may be local (on every node) or s3:// (rank 0 may run on
any node).
"""

from __future__ import annotations

import torch

from clip_model import Tokenizer, image_transform
from clip_model.zero_shot import build_zero_shot_classifier, get_templates, predict
from pipelines import storage
from pipelines.evaluation.data import image_folder
from pipelines.evaluation.embed import decode_image


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
        decoded = [(decode_image(storage.read_bytes(u["path"])), u["label"]) for u in eval_set.units]
        usable = [(transform(image), label) for image, label in decoded if image is not None]
        if not usable:
            raise ValueError(f"zero_shot_data {folder}: none of its {len(decoded)} images can be read")
        self.skipped = len(decoded) - len(usable)
        self.images = torch.stack([image for image, _ in usable])
        self.labels = torch.tensor([label for _, label in usable])
        self.class_names = eval_set.class_names
        self.templates = get_templates(
            storage.local_file(templates) if storage.is_s3(templates) else templates
        )
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
