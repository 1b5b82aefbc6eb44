"""Zero-shot classifiers from class names and prompt templates (CLIP paper, section 3.1.4).

Each class name is put into every template ("a photo of a {}."), the texts are embedded, each embedding is
L2-normalised, the embeddings of one class are averaged and the mean is normalised again (prompt
ensembling). The result is a [D, C] matrix: image features @ weights gives cosine similarities per class.

The templates below are our own, written in the spirit of the paper's 80 ImageNet prompts: they describe
the kind of picture (photo, drawing, crop, blurry, ...) rather than the object.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

DEFAULT_TEMPLATES: list[str] = [
    "a photo of a {}.",
    "a photo of the {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a close-up photo of a {}.",
    "a close-up photo of the {}.",
    "a cropped photo of a {}.",
    "a cropped photo of the {}.",
    "a bright photo of a {}.",
    "a dark photo of a {}.",
    "a blurry photo of a {}.",
    "a blurry photo of the {}.",
    "a low resolution photo of a {}.",
    "a pixelated photo of a {}.",
    "a jpeg corrupted photo of a {}.",
    "a good photo of a {}.",
    "a bad photo of a {}.",
    "a nice photo of the {}.",
    "a photo of a small {}.",
    "a photo of a big {}.",
    "a photo of one {}.",
    "a photo of many {}.",
    "a drawing of a {}.",
    "a sketch of a {}.",
    "a painting of a {}.",
    "a rendering of a {}.",
    "a 3d render of a {}.",
    "a cartoon {}.",
    "a plastic {}.",
    "a toy {}.",
    "an origami {}.",
    "a sculpture of a {}.",
    "a tattoo of a {}.",
    "an embroidered {}.",
    "a black and white photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a photo of a weird {}.",
    "a photo of the cool {}.",
    "itap of a {}.",
    "art of the {}.",
    "graffiti of a {}.",
    "a doodle of a {}.",
    "a {} in a video game.",
    "there is a {} in the scene.",
    "there is the {} in the scene.",
    "this is a {} in the scene.",
    "a snapshot of a {}.",
    "a {}.",
    "{}",
]

TASK_TEMPLATES: dict[str, list[str]] = {
    "default": DEFAULT_TEMPLATES,
    "photo": ["a photo of a {}."],
    "satellite": [
        "a satellite photo of {}.",
        "a satellite image of {}.",
        "an aerial photo of {}.",
        "an aerial view of {}.",
        "a centered satellite photo of {}.",
        "a remote sensing image of {}.",
        "a land use photo of {}, seen from above.",
    ],
    "textures": [
        "a photo of a {} texture.",
        "a photo of a {} pattern.",
        "a photo of a {} thing.",
        "a photo of a {} object.",
        "a close-up of a {} surface.",
        "a {} texture.",
        "a {} pattern.",
    ],
    "digits": [
        'a photo of the number: "{}".',
        'a photo of the digit "{}".',
        'an image of the handwritten number "{}".',
        "a picture of the number {}.",
        "the digit {} written in ink.",
        "a street sign with the number {}.",
    ],
    "pets": [
        "a photo of a {}, a type of pet.",
        "a photo of my {}.",
        "a close-up photo of a {}, a type of pet.",
        "a blurry photo of a {}, a type of pet.",
        "a photo of the cute {}.",
    ],
    "food": [
        "a photo of {}, a type of food.",
        "a photo of a plate of {}.",
        "a close-up photo of {}, a type of food.",
        "a photo of {} served at a restaurant.",
        "a photo of homemade {}.",
    ],
    "flowers": [
        "a photo of a {}, a type of flower.",
        "a close-up photo of a {}, a type of flower.",
        "a photo of a {} in bloom.",
    ],
    "cars": [
        "a photo of a {}.",
        "a photo of my {}.",
        "a photo of a {}, a type of car.",
        "a photo of the {} on the road.",
    ],
    "aircraft": [
        "a photo of a {}, a type of aircraft.",
        "a photo of the {}, a type of aircraft.",
        "a photo of a {} in the sky.",
    ],
    "scenes": [
        "a photo of a {}.",
        "a photo of the {}.",
        "a photo taken at a {}.",
        "a view of a {}.",
    ],
    "shapes": [
        "a picture of a {}.",
        "a drawing of a {}.",
        "a rendering of a {}.",
        "an image with a {}.",
        "a simple illustration of a {}.",
    ],
}


class ZeroShotError(ValueError):
    """Bad zero-shot input: templates without a slot, class names that tokenize to nothing."""


def _check_templates(templates: Sequence[str], source: str) -> list[str]:
    templates = [t for t in templates if t.strip()]
    if not templates:
        raise ZeroShotError(f"{source}: no templates")
    missing = [t for t in templates if "{}" not in t]
    if missing:
        raise ZeroShotError(f"{source}: templates need a '{{}}' slot for the class name: {missing[:5]}")
    return list(templates)


def load_templates(path: str | Path) -> list[str]:
    """Templates from a file: .txt one per line ('#' comments and blank lines ignored), or .json holding a
    list of strings or {"templates": [...]}."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        data = json.loads(text)
        if isinstance(data, dict):
            data = data.get("templates")
        if not isinstance(data, list) or not all(isinstance(t, str) for t in data):
            raise ZeroShotError(f"{path}: expected a JSON list of strings or {{'templates': [...]}}")
        return _check_templates(data, str(path))
    lines = [line.rstrip("\n") for line in text.splitlines()]
    return _check_templates([ln for ln in lines if ln.strip() and not ln.lstrip().startswith("#")], str(path))


def get_templates(name_or_path: str | Sequence[str] = "default") -> list[str]:
    """A task's template set by name ("default", "satellite", ...), a file path, or an explicit list."""
    if not isinstance(name_or_path, str):
        return _check_templates(list(name_or_path), "templates")
    if name_or_path in TASK_TEMPLATES:
        return list(TASK_TEMPLATES[name_or_path])
    if Path(name_or_path).is_file():
        return load_templates(name_or_path)
    raise ZeroShotError(
        f"unknown template set {name_or_path!r}: not a file and not one of {sorted(TASK_TEMPLATES)}"
    )


def load_class_names(path: str | Path) -> list[str] | dict[str, str]:
    """Class names from a file: .txt one per line, or .json holding a list (names in label order) or a
    mapping {folder_or_label: readable name}."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        data = json.loads(text)
        if isinstance(data, list) and all(isinstance(c, str) for c in data):
            return data
        if isinstance(data, dict) and all(isinstance(v, str) for v in data.values()):
            return {str(k): v for k, v in data.items()}
        raise ZeroShotError(f"{path}: expected a JSON list of names or a mapping label -> name")
    return [ln.strip() for ln in text.splitlines() if ln.strip()]


def empty_class_names(tokenizer: Callable, class_names: Sequence[str]) -> list[str]:
    """Class names whose tokens are only start + end token: nothing would tell those classes apart."""
    tokens = tokenizer(list(class_names))
    # The end token has the largest id (OpenAI's convention), so argmax finds it; at index 1 = empty.
    return [name for name, eot in zip(class_names, tokens.argmax(dim=-1).tolist()) if eot <= 1]


@torch.no_grad()
def class_embeddings(
    model,
    tokenizer: Callable,
    class_names: Sequence[str],
    templates: Sequence[str],
    batch_size: int = 256,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """[C, D] float32: per class, embed every template, L2-normalise, average, renormalise. The classifier's
    arithmetic for any subset of the classes, so an actor pool can compute it a batch of classes at a time."""
    if device is None:
        device = (
            next(iter(model.parameters()), torch.empty(0)).device if hasattr(model, "parameters") else "cpu"
        )
    texts = [t.format(c) for c in class_names for t in templates]
    features = []
    for start in range(0, len(texts), batch_size):
        tokens = tokenizer(texts[start : start + batch_size]).to(device)
        features.append(F.normalize(model.encode_text(tokens).float(), dim=-1).cpu())
    per_class = torch.cat(features).view(len(class_names), len(templates), -1)
    return F.normalize(per_class.mean(dim=1), dim=-1)


def check_zero_shot_inputs(
    tokenizer: Callable, class_names: Sequence[str], templates: Sequence[str]
) -> list[str]:
    """The templates to use; a ZeroShotError when there are no classes, no usable template, or class names
    that tokenize to nothing."""
    if not class_names:
        raise ZeroShotError("no class names")
    templates = _check_templates(templates, "templates")
    empty = empty_class_names(tokenizer, class_names)
    if empty:
        raise ZeroShotError(
            f"{len(empty)} class name(s) tokenize to nothing and cannot be told apart: {empty[:10]}; "
            "give them readable names (class-name file) or drop those classes"
        )
    return templates


def build_zero_shot_classifier(
    model,
    tokenizer: Callable,
    class_names: Sequence[str],
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    batch_size: int = 256,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """[D, C] float32 classifier: per class, embed every template, L2-normalise, average, renormalise."""
    templates = check_zero_shot_inputs(tokenizer, class_names, templates)
    return class_embeddings(model, tokenizer, class_names, templates, batch_size, device).T.contiguous()


def zero_shot_logits(
    image_features: torch.Tensor, weights: torch.Tensor, scale: float = 100.0
) -> torch.Tensor:
    """[N, C] scaled cosine similarities between (unnormalised) image features and classifier weights."""
    return scale * F.normalize(image_features.float(), dim=-1) @ weights.to(image_features.device)


def predict(image_features: torch.Tensor, weights: torch.Tensor, k: int = 1) -> torch.Tensor:
    """[N, k] class indices, best first."""
    logits = zero_shot_logits(image_features, weights)
    return logits.topk(min(k, logits.shape[1]), dim=-1).indices
