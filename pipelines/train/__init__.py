"""CLIP training on Ray Train, fed by Ray Data from WebDataset/Parquet shards.

`config.TrainConfig` (YAML + overrides) -> `trainer.build_trainer` (TorchTrainer) -> `loop.train_loop_per_worker`
on every worker: DDP, all-gathered contrastive loss, mixed precision, exact contrastive gradient accumulation
(`gradcache`), checkpoints that resume at the exact step and data position.
"""
