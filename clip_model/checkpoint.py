"""OpenAI-layout checkpoints: load them (configuration inferred from the weights alone, as OpenAI's
`build_model`) and write them (fp32 or fp16)."""

from __future__ import annotations

import io
import os
import zipfile
from collections.abc import Mapping
from typing import BinaryIO

import torch

from .configs import CLIPConfig
from .model import CLIP
from .safe_pickle import refusal_reason, torchscript_tensors

# Scalars that OpenAI's TorchScript archives carry in their state dict and `build_model` deletes, and
# the causal mask, a non-persistent buffer that TorchScript archives of this model nevertheless carry.
_JIT_ATTRIBUTES = ("input_resolution", "context_length", "vocab_size", "attn_mask")


class CheckpointError(ValueError):
    """A state dict that does not describe a CLIP model of the OpenAI layout."""


def _read_state_dict(source: str | os.PathLike | BinaryIO) -> Mapping:
    """A plain `torch.save` file (a state dict, possibly under "state_dict"), a `.safetensors` file or a
    TorchScript archive. Nothing in the file runs: `torch.save` files load with `weights_only=True`, and a
    TorchScript archive's tensors are read from its pickle without executing its code (`torch.jit.load`
    would run the archive's TorchScript, e.g. a `__setstate__`)."""
    if isinstance(source, (str, os.PathLike)) and os.fspath(source).endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(os.fspath(source))
    if not isinstance(source, (str, os.PathLike)):
        source = io.BytesIO(source.read())
    is_jit = False
    if zipfile.is_zipfile(source):
        with zipfile.ZipFile(source) as zf:
            # TorchScript archives hold the module's code; torch.save archives only data.pkl and tensors.
            is_jit = any(name.split("/", 1)[-1].startswith("code/") for name in zf.namelist())
    if isinstance(source, io.BytesIO):
        source.seek(0)
    try:
        if is_jit:
            return torchscript_tensors(source)
        return torch.load(source, map_location="cpu", weights_only=True)
    except Exception as e:
        kind = (
            "not a loadable TorchScript archive"
            if is_jit
            else "neither a state-dict file nor a TorchScript archive"
        )
        raise CheckpointError(
            f"{_name(source)}: {kind} ({refusal_reason(e)}); nothing in it was run"
        ) from None


def _name(source) -> str:
    return os.fspath(source) if isinstance(source, (str, os.PathLike)) else "the checkpoint stream"


def _unwrap(state_dict: Mapping) -> dict[str, torch.Tensor]:
    """Accept {"state_dict": ...} wrappers and DDP's "module." prefix (open_clip training checkpoints)."""
    if "state_dict" in state_dict and isinstance(state_dict["state_dict"], Mapping):
        state_dict = state_dict["state_dict"]
    if not isinstance(state_dict, Mapping):
        raise CheckpointError(
            f"expected a state dict (a mapping of names to tensors), got {type(state_dict)}"
        )
    if state_dict and all(k.startswith("module.") for k in state_dict):
        state_dict = {k[len("module.") :]: v for k, v in state_dict.items()}
    return {k: v for k, v in state_dict.items() if k not in _JIT_ATTRIBUTES}


def _require(state_dict: Mapping[str, torch.Tensor], *keys: str) -> None:
    missing = [k for k in keys if k not in state_dict]
    if missing:
        raise CheckpointError(
            f"cannot infer the CLIP configuration: missing key(s) {missing} "
            f"(state dict has {len(state_dict)} keys, e.g. {sorted(state_dict)[:5]})"
        )


def _count_blocks(state_dict: Mapping[str, torch.Tensor], prefix: str) -> int:
    """Number of distinct block indices i among keys `{prefix}{i}.…`."""
    return len({k[len(prefix) :].split(".", 1)[0] for k in state_dict if k.startswith(prefix)})


def infer_config(state_dict: Mapping[str, torch.Tensor]) -> CLIPConfig:
    """The configuration of the model that produced an OpenAI-layout state dict (as `build_model`)."""
    state_dict = _unwrap(state_dict)
    _require(
        state_dict, "text_projection", "positional_embedding", "token_embedding.weight", "ln_final.weight"
    )
    if "visual.proj" in state_dict:
        _require(state_dict, "visual.conv1.weight", "visual.positional_embedding")
        vision_width = state_dict["visual.conv1.weight"].shape[0]
        vision_layers = _count_blocks(state_dict, "visual.transformer.resblocks.")
        vision_patch_size = state_dict["visual.conv1.weight"].shape[-1]
        n_tokens = state_dict["visual.positional_embedding"].shape[0]
        grid_size = round((n_tokens - 1) ** 0.5)
        if grid_size**2 + 1 != n_tokens:
            raise CheckpointError(f"visual.positional_embedding has {n_tokens} rows, not grid**2 + 1")
        image_resolution = vision_patch_size * grid_size
    else:
        _require(state_dict, "visual.layer1.0.conv1.weight", "visual.attnpool.positional_embedding")
        vision_layers = tuple(_count_blocks(state_dict, f"visual.layer{b}.") for b in (1, 2, 3, 4))
        vision_width = state_dict["visual.layer1.0.conv1.weight"].shape[0]
        vision_patch_size = None
        n_tokens = state_dict["visual.attnpool.positional_embedding"].shape[0]
        output_width = round((n_tokens - 1) ** 0.5)
        if output_width**2 + 1 != n_tokens:
            raise CheckpointError(
                f"visual.attnpool.positional_embedding has {n_tokens} rows, not grid**2 + 1"
            )
        image_resolution = output_width * 32

    transformer_width = state_dict["ln_final.weight"].shape[0]
    try:
        return CLIPConfig(
            embed_dim=state_dict["text_projection"].shape[1],
            image_resolution=image_resolution,
            vision_layers=vision_layers,
            vision_width=vision_width,
            vision_patch_size=vision_patch_size,
            context_length=state_dict["positional_embedding"].shape[0],
            vocab_size=state_dict["token_embedding.weight"].shape[0],
            transformer_width=transformer_width,
            transformer_heads=max(transformer_width // 64, 1),
            transformer_layers=_count_blocks(state_dict, "transformer.resblocks."),
        )
    except ValueError as e:
        raise CheckpointError(f"the state dict describes an invalid model: {e}") from e


def _check_compatible(model: CLIP, state_dict: Mapping[str, torch.Tensor]) -> None:
    expected = model.state_dict()
    # BatchNorm's num_batches_tracked counters are optional (not every exporter writes them).
    missing = [k for k in expected if k not in state_dict and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state_dict if k not in expected]
    wrong_shape = [
        f"{k}: expected {tuple(expected[k].shape)}, got {tuple(state_dict[k].shape)}"
        for k in expected
        if k in state_dict and tuple(expected[k].shape) != tuple(state_dict[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {missing}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected}")
    if wrong_shape:
        problems.append(f"wrong shapes [{'; '.join(wrong_shape)}]")
    if problems:
        raise CheckpointError(
            f"state dict does not match the inferred {model.config}: " + ", ".join(problems)
        )


def load(
    source: str | os.PathLike | BinaryIO | Mapping[str, torch.Tensor], device: torch.device | str = "cpu"
) -> CLIP:
    """A fp32 `CLIP` in eval mode from an OpenAI-layout state dict: a path or file object (a `torch.save`
    file or a TorchScript archive such as OpenAI's released `.pt` files) or an in-memory state dict. The
    configuration is inferred from the tensor shapes; text heads are transformer_width // 64."""
    raw = source if isinstance(source, Mapping) else _read_state_dict(source)
    state_dict = _unwrap(raw)
    config = infer_config(state_dict)
    with torch.device("meta"):  # no time spent initialising weights that are overwritten next
        model = CLIP.from_config(config)
    _check_compatible(model, state_dict)
    state_dict = {
        k: v.to("cpu", torch.float32, copy=True) if v.is_floating_point() else v.to("cpu", copy=True)
        for k, v in state_dict.items()
    }
    model.load_state_dict(state_dict, strict=False, assign=True)  # strictness checked above, with names
    # What the state dict does not carry: the causal mask and (optionally) BatchNorm batch counters.
    model.attn_mask = model.build_attention_mask()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d) and module.num_batches_tracked.is_meta:
            module.num_batches_tracked = torch.tensor(0, dtype=torch.long)
    return model.to(device).eval()


def to_openai_state_dict(model: CLIP, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """The model's weights in OpenAI's layout on CPU, floating-point tensors cast to `dtype`."""
    config = model.config
    if config.transformer_heads != max(config.transformer_width // 64, 1):
        raise ValueError(
            f"transformer_heads={config.transformer_heads} cannot be stored in the OpenAI layout: loaders "
            f"infer heads as transformer_width // 64 = {config.transformer_width // 64}"
        )
    return {
        k: (v.detach().to("cpu", dtype) if v.is_floating_point() else v.detach().cpu()).clone()
        for k, v in model.state_dict().items()
    }


def save_openai_checkpoint(model: CLIP, path: str | os.PathLike, dtype: torch.dtype = torch.float16) -> None:
    """Write the OpenAI-layout state dict with `torch.save` (loadable by OpenAI's `clip.load`, open_clip
    and `load` here). Written to a temporary name first, then moved into place."""
    tmp = f"{os.fspath(path)}.tmp"
    torch.save(to_openai_state_dict(model, dtype), tmp)
    os.replace(tmp, path)
