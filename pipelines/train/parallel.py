"""FSDP2 for the largest models (`fsdp: true`): parameters, gradients and Adam state sharded over ranks,
checkpoints written shard by shard with torch.distributed.checkpoint.

Each transformer block (ResNet stage for ResNet image towers) is its own FSDP unit, the FeatureModel the
root. The logit scale is a 0-dim parameter, which fully_shard cannot shard: it stays replicated, and its
gradient is averaged over ranks by `reduce_replicated_grads` before each optimizer step (what DDP does).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from clip_model.safe_pickle import UnsafePickleError, load_restricted


def _units(clip: nn.Module) -> list[nn.Module]:
    visual = clip.visual
    if hasattr(visual, "transformer"):
        blocks = list(visual.transformer.resblocks)
    else:
        blocks = [visual.layer1, visual.layer2, visual.layer3, visual.layer4]
    return blocks + list(clip.transformer.resblocks)


def fully_shard_clip(model: nn.Module, device: torch.device) -> nn.Module:
    """Shard a `FeatureModel` in place (blocks, then the root) and return it."""
    from torch.distributed.fsdp import fully_shard

    model.to(device)
    for unit in _units(model.clip):
        fully_shard(unit)
    fully_shard(model, ignored_params={model.clip.logit_scale})
    return model


def compile_units(clip: nn.Module, backend: str) -> None:
    """torch.compile each FSDP unit in place (state-dict keys unchanged). Compiling the whole sharded model
    instead would break its graph at every unit's all-gather hook (5 breaks, 8 graphs for tiny-vit)."""
    for unit in _units(clip):
        unit.compile(backend=backend)


def reduce_replicated_grads(clip: nn.Module) -> None:
    """Average the replicated logit scale's gradient over ranks (one tiny all-reduce)."""
    grad = clip.logit_scale.grad
    if grad is not None and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(grad)
        grad /= dist.get_world_size()


def _uncompiled(model: nn.Module) -> nn.Module:
    return getattr(model, "_orig_mod", model)  # torch.compile's wrapper would prefix every key


def save_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, folder: str) -> None:
    """Every rank writes its shards of weights and optimizer state (plus rank 0 the metadata)."""
    model = _uncompiled(model)
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
    dcp.save(state, checkpoint_id=folder)


DCP_METADATA_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")


def check_sharded_metadata(folder: str) -> None:
    """torch.distributed.checkpoint reads `.metadata` with plain `pickle.load` (it would run whatever a
    planted file holds): unpickle it first allowing only DCP's metadata classes, dtypes and sizes."""
    path = os.path.join(folder, ".metadata")
    try:
        with open(path, "rb") as f:
            load_restricted(f.read(), DCP_METADATA_MODULES)
    except UnsafePickleError as e:
        raise ValueError(f"refusing to load {path}: it {e}, so loading it could run code") from None


def load_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, folder: str) -> None:
    check_sharded_metadata(folder)
    model = _uncompiled(model)
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
    dcp.load(state, checkpoint_id=folder)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optim"])


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The CLIP's full weights on rank 0's CPU (empty elsewhere); a collective every rank must call."""
    full = get_model_state_dict(
        _uncompiled(model), options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    return {k.removeprefix("clip."): v for k, v in full.items()}
