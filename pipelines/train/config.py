"""TrainConfig: everything a training run needs, loaded from YAML with `a.b=value` overrides."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from clip_model import get_config


@dataclass
class TrainConfig:
    # Model: a clip_model name plus CLIPConfig overrides (e.g. {vocab_size: 800, image_resolution: 32}).
    model: str = "tiny-vit"
    model_overrides: dict = field(default_factory=dict)
    tokenizer_merges: str | None = None  # OpenAI-layout merges file (local or s3://); required
    grad_checkpointing: bool = False

    # Data: shards (pipelines/datasets.py): a folder of ours or another tool's (img2dataset's output), a
    # brace list `s3://bucket/{00000..01023}.tar`, several joined by `::`; local or s3://.
    data_uri: str = ""
    data_format: Literal["webdataset", "parquet"] = "webdataset"
    # A shard that cannot be read (random bytes, cut short, Parquet without `jpg`) is skipped or read up to
    # its damage, named and counted in the epoch's line; more bad shards than this fraction stops the run.
    max_bad_shard_fraction: float = 0.05
    # A selection of data_uri's rows (pipelines/selection.py: the filter job's `selection/` folder, or the
    # folder holding it): only those rows are counted, read and trained on. "" = every row.
    selection: str = ""
    # Read order (pipelines/train/position.py): each worker draws rows from this many of its shards at once,
    # rows shuffled inside each shard; the compressed bytes of these shards are held in memory.
    shards_in_flight: int = 4
    # Decode (JPEG -> uint8 crop, tokens), see pipelines/train/ingest.py. "tasks": Ray tasks asking for
    # `decode_resource` ("CPU": CPU nodes; "ingest_cpu": the GPU nodes' own cores, a custom resource only GPU
    # node types advertise). "worker": threads inside each training worker.
    decode_on: Literal["tasks", "worker"] = "tasks"
    decode_resource: str = "CPU"
    decode_cpus: float = 0.5  # of decode_resource per decode task
    decode_ahead: int = 4  # decode batches in flight per training worker, at least
    decode_batch_size: int = 64
    # Decoded data ahead of the trainer in seconds: enough decode batches in flight to cover this many
    # seconds at the trainer's measured pace (so one slow batch hides behind the others), at most
    # `decode_ahead_max_mb` of decoded uint8 per worker. 0 = exactly `decode_ahead` batches.
    decode_ahead_s: float = 2.0
    decode_ahead_max_mb: float = 512.0
    # A decode batch running `straggler_factor` x the median batch time (and at least `straggler_min_s`)
    # gets a second copy; the first result wins. 0 = never.
    straggler_factor: float = 3.0
    straggler_min_s: float = 1.0

    # Batch and length. The global contrastive batch is batch_size * num_workers; with accum_steps > 1
    # each worker splits its batch into that many micro-batches (exact gradient cache, see gradcache.py).
    batch_size: int = 32  # per worker
    accum_steps: int = 1
    epochs: int = 1
    max_steps: int = 0  # > 0: stop after this many optimizer steps (else epochs over the data)

    # Optimisation (paper: Adam, decoupled weight decay 0.2, warm-up then cosine).
    lr: float = 5e-4
    warmup_steps: int = 2000
    weight_decay: float = 0.2
    beta1: float = 0.9
    beta2: float | None = None  # None: 0.999 for ResNets, 0.98 for ViTs
    eps: float | None = None  # None: 1e-8 for ResNets, 1e-6 for ViTs
    # auto: bf16 autocast on GPUs that support it, else fp16 + GradScaler (the paper's recipe) on GPU, fp32
    # on CPU. fp16 needs a GPU (on CPU it falls back to fp32); bf16 works on CPU too.
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    compile: bool = False  # torch.compile the model
    # torch.compile's backend: "inductor" (generated kernels: the fast one), or e.g. "aot_eager" (the same
    # graph capture and autograd split without code generation: seconds to compile instead of minutes on CPU).
    compile_backend: str = "inductor"
    fsdp: bool = False  # FSDP2 (sharded weights/optimizer, sharded checkpoints) instead of DDP
    max_logit_scale: float = 100.0

    # Ray Train.
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 0.5  # < 1 leaves CPUs for the Ray Data decode tasks on small machines
    gpus_per_worker: float = 1.0
    max_failures: int = 0
    # Local folder (shared by every node) or s3://. "": `s3://<data bucket>/runs` when the data is on S3,
    # else `runs/` under the working directory on a single-node cluster; required on a multi-node one.
    storage_path: str = ""
    name: str = "clip"
    checkpoint_every: int = 0  # steps; 0 = at the end of each epoch only
    keep_checkpoints: int = 2
    checkpoint_upload: Literal["async", "sync"] = "async"  # async: training goes on while Ray uploads
    resume_from: str | None = None  # a checkpoint folder to start from (same model config only)
    seed: int = 0
    log_every: int = 10  # steps between our step lines (and metrics.csv rows)
    verbose: bool = False  # true: Ray Train's own per-report log lines too (`--verbose` on the job)
    # Periodic zero-shot check (rank 0): an image folder with one sub-folder per class, prompt templates
    # (a clip_model template set name or a file), every N steps (0 = at each epoch end). "" = off.
    zero_shot_data: str = ""
    zero_shot_templates: str = "default"
    zero_shot_every: int = 0
    zero_shot_limit_per_class: int = 50

    # Failure drill: the last worker kills its own process once, right after this step (0 = never).
    crash_at_step: int = 0

    def __post_init__(self) -> None:
        problems = []
        if self.batch_size < 1 or self.accum_steps < 1 or self.batch_size % self.accum_steps:
            problems.append(
                f"batch_size {self.batch_size} must be a positive multiple of accum_steps {self.accum_steps}"
            )
        if self.num_workers < 1:
            problems.append("num_workers must be >= 1")
        if self.shards_in_flight < 1 or self.decode_ahead < 1 or self.decode_batch_size < 1:
            problems.append("shards_in_flight, decode_ahead and decode_batch_size must be >= 1")
        if self.decode_ahead_s < 0 or self.decode_ahead_max_mb <= 0 or self.straggler_min_s < 0:
            problems.append("decode_ahead_s and straggler_min_s must be >= 0, decode_ahead_max_mb > 0")
        if self.straggler_factor != 0 and self.straggler_factor < 1:
            problems.append(f"straggler_factor {self.straggler_factor} must be 0 (off) or >= 1")
        if self.epochs < 1 and self.max_steps < 1:
            problems.append("set epochs >= 1 or max_steps >= 1")
        if not 0 <= self.max_bad_shard_fraction <= 1:
            problems.append(f"max_bad_shard_fraction {self.max_bad_shard_fraction} must be in [0, 1]")
        try:
            self.model_config()
        except ValueError as e:  # an unknown model name or override key, named at parse time
            problems.append(f"{'model' if 'Unknown model' in str(e) else 'model_overrides'}: {e}")
        if self.compile and not _known_backend(self.compile_backend):
            problems.append(f"compile_backend {self.compile_backend!r} is not a torch.compile backend")
        if problems:
            raise ValueError("Invalid TrainConfig: " + "; ".join(problems))

    def model_config(self):
        return get_config(self.model, **self.model_overrides)

    def adam_betas_eps(self) -> tuple[tuple[float, float], float]:
        """β1, β2, ε: the paper's per-architecture defaults unless set explicitly."""
        resnet = self.model_config().is_resnet
        beta2 = self.beta2 if self.beta2 is not None else (0.999 if resnet else 0.98)
        eps = self.eps if self.eps is not None else (1e-8 if resnet else 1e-6)
        return (self.beta1, beta2), eps


def _known_backend(name: str) -> bool:
    from torch._dynamo.backends.registry import lookup_backend
    from torch._dynamo.exc import InvalidBackend

    try:
        lookup_backend(name)
    except InvalidBackend:
        return False
    return True
