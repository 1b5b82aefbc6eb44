"""`CLIPConfig` and the named CLIP configurations (OpenAI's spelling); `factory.create_model` builds them."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass
class CLIPConfig:
    """The arguments of OpenAI's `CLIP`/`build_model`. A tuple `vision_layers` (blocks per ResNet stage)
    selects the modified ResNet, an int (transformer layers) the ViT. Attention heads are derived as in
    OpenAI's code: ViT width // 64, ResNet width * 32 // 64; text heads are stored but a state dict can
    only carry transformer_width // 64 (see checkpoint.py)."""

    embed_dim: int
    image_resolution: int
    vision_layers: tuple[int, ...] | int
    vision_width: int
    vision_patch_size: int | None
    context_length: int = 77
    vocab_size: int = 49408
    transformer_width: int = 512
    transformer_heads: int = 8
    transformer_layers: int = 12

    def __post_init__(self) -> None:
        if isinstance(self.vision_layers, list):
            self.vision_layers = tuple(self.vision_layers)
        problems = []
        if self.is_resnet:
            if len(self.vision_layers) != 4:
                problems.append(f"vision_layers must have 4 stages for a ResNet, got {self.vision_layers}")
            if self.image_resolution % 32:
                problems.append(
                    f"image_resolution {self.image_resolution} must be a multiple of 32 for a ResNet"
                )
            if self.vision_width % 2:
                problems.append(f"vision_width {self.vision_width} must be even for a ResNet")
        else:
            if not self.vision_patch_size:
                problems.append("vision_patch_size is required for a ViT (vision_layers is an int)")
            elif self.image_resolution % self.vision_patch_size:
                problems.append(
                    f"image_resolution {self.image_resolution} must be a multiple of "
                    f"vision_patch_size {self.vision_patch_size}"
                )
            if self.vision_width < 64 or self.vision_width % 64:
                problems.append(
                    f"vision_width {self.vision_width} must be a multiple of 64 (ViT heads are width // 64)"
                )
        if self.transformer_heads < 1 or self.transformer_width % self.transformer_heads:
            problems.append(
                f"transformer_width {self.transformer_width} must be divisible by transformer_heads "
                f"{self.transformer_heads}"
            )
        if problems:
            raise ValueError("Invalid CLIPConfig: " + "; ".join(problems))

    @property
    def is_resnet(self) -> bool:
        return isinstance(self.vision_layers, tuple)

    @property
    def vision_heads(self) -> int:
        return self.vision_width * 32 // 64 if self.is_resnet else self.vision_width // 64


_CONFIGS: dict[str, CLIPConfig] = {
    "RN50": CLIPConfig(1024, 224, (3, 4, 6, 3), 64, None, 77, 49408, 512, 8, 12),
    "RN101": CLIPConfig(512, 224, (3, 4, 23, 3), 64, None, 77, 49408, 512, 8, 12),
    "RN50x4": CLIPConfig(640, 288, (4, 6, 10, 6), 80, None, 77, 49408, 640, 10, 12),
    "RN50x16": CLIPConfig(768, 384, (6, 8, 18, 8), 96, None, 77, 49408, 768, 12, 12),
    "RN50x64": CLIPConfig(1024, 448, (3, 15, 36, 10), 128, None, 77, 49408, 1024, 16, 12),
    "ViT-B/32": CLIPConfig(512, 224, 12, 768, 32, 77, 49408, 512, 8, 12),
    "ViT-B/16": CLIPConfig(512, 224, 12, 768, 16, 77, 49408, 512, 8, 12),
    "ViT-L/14": CLIPConfig(768, 224, 24, 1024, 14, 77, 49408, 768, 12, 12),
    "ViT-L/14@336px": CLIPConfig(768, 336, 24, 1024, 14, 77, 49408, 768, 12, 12),
    # Tiny models for tests and the CPU demo: 64px images, head width 64 like the released models so that
    # the loader infers them back from their weights. Most of their parameters are the token embedding:
    # pass vocab_size= to match a smaller trained tokenizer.
    "tiny-vit": CLIPConfig(128, 64, 4, 128, 8, 77, 49408, 128, 2, 4),
    "tiny-rn": CLIPConfig(128, 64, (1, 1, 1, 1), 16, None, 77, 49408, 128, 2, 4),
}


def available_models() -> list[str]:
    """Names accepted by `get_config` and `create_model`."""
    return list(_CONFIGS)


def get_config(name: str, **overrides) -> CLIPConfig:
    """A fresh copy of the named configuration, with any CLIPConfig field overridden."""
    if name not in _CONFIGS:
        raise ValueError(f"Unknown model {name!r}; available models: {', '.join(available_models())}")
    fields = [f.name for f in dataclasses.fields(CLIPConfig)]
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise ValueError(f"Unknown CLIPConfig field(s) {unknown}; valid fields: {', '.join(fields)}")
    return dataclasses.replace(_CONFIGS[name], **overrides)
