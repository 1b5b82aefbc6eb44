"""open_clip's training loader on our shards, for benchmarks/bench_ingest.py; runs in .venv-openclip
(scripts/setup_open_clip.sh), never imports this project. `open_clip_train.data.get_wds_dataset` as
open_clip's `main` calls it, with `open_clip.image_transform(224, is_train=True)` and the ViT-B-32
tokenizer; the model step is a no-op. Prints one JSON line: the wall-clock time of each batch."""

import argparse
import json
import time

import open_clip
from open_clip_train.data import get_wds_dataset


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shards", required=True, help="'::'-joined .tar paths")
    parser.add_argument("--samples", type=int, required=True)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    cli = parser.parse_args()
    args = argparse.Namespace(
        train_data=cli.shards, train_num_samples=cli.samples, dataset_resampled=False,
        train_data_upsampling_factors=None, seed=0, batch_size=cli.batch, world_size=1, workers=cli.workers,
    )  # fmt: skip
    preprocess = open_clip.image_transform(224, is_train=True)
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    data = get_wds_dataset(args, preprocess, is_train=True, epoch=0, tokenizer=tokenizer)
    times = []
    for images, texts in data.dataloader:
        assert images.shape[1:] == (3, 224, 224) and texts.shape[1] == 77
        times.append(time.time())
    print(json.dumps({"times": times, "batches": len(times)}))


if __name__ == "__main__":
    main()
