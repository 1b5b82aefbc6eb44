"""Parameter counts and FLOPs per sample of each configuration, computed on the meta device (no weights
are allocated, so the largest models take well under a second each).

    python -m clip_model.summary                 # every configuration
    python -m clip_model.summary RN50 ViT-B/32   # some

FLOPs count a multiply-add as 2 (torch.utils.flop_counter), for one image at the model's resolution and
one full-length (context_length tokens) caption.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from .configs import available_models
from .factory import create_model


@dataclass
class ModelSummary:
    name: str
    params: int
    image_params: int
    text_params: int  # everything outside `visual`: text tower, projection, logit scale
    image_gflops: float
    text_gflops: float
    image_resolution: int

    @property
    def gflops(self) -> float:
        return self.image_gflops + self.text_gflops


def _flops(fn, *args) -> int:
    with FlopCounterMode(display=False) as counter:
        fn(*args)
    return counter.get_total_flops()


def summarize(name: str, **overrides) -> ModelSummary:
    model = create_model(name, device="meta", **overrides)
    config = model.config
    params = sum(p.numel() for p in model.parameters())
    image_params = sum(p.numel() for p in model.visual.parameters())
    with torch.no_grad():
        image = torch.empty(1, 3, config.image_resolution, config.image_resolution, device="meta")
        text = torch.zeros(1, config.context_length, dtype=torch.long, device="meta")
        image_flops = _flops(model.encode_image, image)
        text_flops = _flops(model.encode_text, text)
    return ModelSummary(
        name=name,
        params=params,
        image_params=image_params,
        text_params=params - image_params,
        image_gflops=image_flops / 1e9,
        text_gflops=text_flops / 1e9,
        image_resolution=config.image_resolution,
    )


def format_table(rows: list[ModelSummary]) -> str:
    header = f"{'model':<16} {'res':>4} {'params':>13} {'image':>13} {'text':>13} {'img GFLOPs':>11} {'txt GFLOPs':>11}"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r.name:<16} {r.image_resolution:>4} {r.params:>13,} {r.image_params:>13,} {r.text_params:>13,} "
            f"{r.image_gflops:>11.2f} {r.text_gflops:>11.2f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Parameter counts and FLOPs per sample of CLIP configurations."
    )
    parser.add_argument(
        "names", nargs="*", help=f"configurations (default: all of {', '.join(available_models())})"
    )
    args = parser.parse_args(argv)
    names = args.names or available_models()
    unknown = [n for n in names if n not in available_models()]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; available models: {', '.join(available_models())}")
    print(format_table([summarize(n) for n in names]))


if __name__ == "__main__":
    main()
