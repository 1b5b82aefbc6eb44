"""A tiny CLIP trained on clean synthetic pairs (pipelines/synthetic.py), for the filter's tests, benchmark
and demo: a checkpoint that knows what a matched pair looks like, made in about a minute on one core.

The folder it writes is what the filter job takes as `checkpoint=`: `openai_fp16.pt` (OpenAI layout) and
the BPE merges the model was trained with (`merges.txt.gz`).
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from pipelines import synthetic

WEIGHTS, MERGES, CALIBRATION = "openai_fp16.pt", "merges.txt.gz", "clean_scores.json"
CONTEXT = 24
# One head per 64 channels (what the OpenAI layout implies), two blocks per tower: ~0.1 s a step on a core.
NARROW = {
    "embed_dim": 64,
    "vision_width": 64,
    "vision_layers": 2,
    "transformer_width": 64,
    "transformer_heads": 1,
    "transformer_layers": 2,
    "context_length": CONTEXT,
}


def train_clean_clip(
    out_dir: str | Path, n: int = 1000, steps: int = 150, seed: int = 0, image_size: int = 32, batch: int = 64
) -> str:
    """Train a narrow tiny-vit (`image_size` px, width 64, 2+2 layers, 24 tokens) on `n` clean pairs;
    returns the folder."""
    import clip_model
    from pipelines.filter.store import normalize, prepare_pixels

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: one thread wastes no time spinning on a shared machine
    samples = list(synthetic.generate(n, seed=seed + 10_000))
    captions = [s.caption for s in samples]
    tok = clip_model.Tokenizer.train(captions, 600, out / MERGES, context_length=CONTEXT)
    model = clip_model.create_model(
        "tiny-vit", vocab_size=tok.vocab_size, image_resolution=image_size, **NARROW
    )
    pixels = np.stack([prepare_pixels(synthetic.to_jpeg(s.image), image_size)[0] for s in samples])
    images, tokens = normalize(torch.from_numpy(pixels)), tok(captions)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    rng = random.Random(seed)
    model.train()
    for _ in range(steps):
        idx = torch.tensor(rng.sample(range(n), batch))
        loss = clip_model.clip_loss(
            model.encode_image(images[idx]), model.encode_text(tokens[idx]), model.logit_scale.exp()
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    clip_model.save_openai_checkpoint(model.eval(), out / WEIGHTS)
    calibrate(out, seed, model, tok)
    torch.set_num_threads(threads)
    return str(out)


def calibrate(folder: str | Path, seed: int = 0, model=None, tok=None, n: int = 300) -> dict[str, float]:
    """Score percentiles of held-out clean pairs -> `{folder}/clean_scores.json`: a threshold such as `p02`
    keeps 98% of matched pairs, chosen without looking at any noisy data."""
    import json

    from pipelines.evaluation.embed import load_tokenizer
    from pipelines.filter.model import load_clip
    from pipelines.filter.store import normalize, prepare_pixels

    out = Path(folder)
    model = model if model is not None else load_clip(str(out))
    tok = tok if tok is not None else load_tokenizer(str(out / MERGES), model)
    image_size = model.config.image_resolution

    held = list(synthetic.generate(n, seed=seed + 20_000))
    pixels = np.stack([prepare_pixels(synthetic.to_jpeg(s.image), image_size)[0] for s in held])
    with torch.no_grad():
        img = torch.nn.functional.normalize(model.encode_image(normalize(torch.from_numpy(pixels))), dim=-1)
        txt = torch.nn.functional.normalize(model.encode_text(tok([s.caption for s in held])), dim=-1)
    scores = (img * txt).sum(1).numpy()
    pct = {f"p{q:02d}": float(np.percentile(scores, q)) for q in (1, 2, 5, 10, 50)}
    (out / CALIBRATION).write_text(json.dumps(pct, indent=1))
    return pct
