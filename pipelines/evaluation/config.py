"""EvalConfig: what jobs/eval_clip.py evaluates, from YAML + `--set a.b=value` (pipelines/config.py).

Every path may be a local path or an s3:// URI. On a cluster, use s3:// (or a filesystem every node mounts):
the embedding actors run on other nodes and read the checkpoint and the images themselves."""

from __future__ import annotations

from dataclasses import dataclass, field

from .embed import EmbedOptions


@dataclass
class ZeroShotConfig:
    data: str = ""  # image folder (class sub-folders) or shards with a label field, local or s3://; "" = skip
    label_field: str = "label"
    class_names: str = ""  # .txt / .json file with readable class names; "" = folder / label names
    templates: str = "default"  # a template set of clip_model.zero_shot.TASK_TEMPLATES or a .txt/.json file
    selection: str = ""  # shards only: the rows a filter selected (pipelines/selection.py); "" = all rows


@dataclass
class LinearProbeConfig:
    train: str = ""  # labelled images for fitting; "" = skip the probe
    test: str = ""
    val: str = ""  # "" = split val_fraction off the training set
    label_field: str = "label"
    val_fraction: float = 0.2
    max_iter: int = 1000
    steps_per_decade: int = 8
    seed: int = 0
    # Shards only: the rows a filter selected of each set (pipelines/selection.py); "" = all rows.
    train_selection: str = ""
    test_selection: str = ""
    val_selection: str = ""


@dataclass
class RetrievalConfig:
    data: str = ""  # captions .jsonl or shards; "" = skip retrieval
    captions_field: str = "captions"
    ks: list[int] = field(default_factory=lambda: [1, 5, 10])
    selection: str = ""  # shards only: the rows a filter selected (pipelines/selection.py); "" = all rows


@dataclass
class BenchmarkConfig:
    """Datasets in LAION CLIP_benchmark's WebDataset layout (pipelines/evaluation/clip_benchmark.py), read as
    distributed: each with its own class names and templates; results beside the published numbers."""

    datasets: list[str] = field(default_factory=list)  # dataset roots, local or s3://; [] = skip
    split: str = "test"
    model: str = ""  # for the published-number lookup ("ViT-B/32"); "" = the configuration the weights match


@dataclass
class EvalConfig:
    """Evaluate a CLIP checkpoint: zero-shot classification, linear probe, image-text retrieval."""

    checkpoint: str = ""  # trainer checkpoint folder, OpenAI-layout state dict or TorchScript archive
    tokenizer: str = ""  # BPE merges (.txt.gz, local or s3://); "" = the one in the checkpoint folder
    output_dir: str = "runs/eval"  # local folder or s3:// prefix (no feature cache then, unless set)
    zero_shot: ZeroShotConfig = field(default_factory=ZeroShotConfig)
    linear_probe: LinearProbeConfig = field(default_factory=LinearProbeConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig)
    embed: EmbedOptions = field(default_factory=EmbedOptions)
    ray_address: str = ""  # "" = join a running cluster if there is one, else start a local one
