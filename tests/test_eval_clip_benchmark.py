"""CLIP_benchmark's WebDataset layout read unchanged by jobs/eval_clip.py (local and s3://, several datasets in
one run), checked against the model applied by hand; with Ray the classifier's prompts are embedded by the
actor pool, never on the driver; the streamed metrics equal the whole-matrix ones."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import make_checkpoint_folder  # shared builder (tests/ is on sys.path under pytest)
from test_eval_job import load_job

import clip_model
from clip_model.configs import get_config
from clip_model.model import CLIP
from pipelines import storage, synthetic
from pipelines.evaluation import published
from pipelines.evaluation.clip_benchmark import read_layout
from pipelines.evaluation.config import EvalConfig
from pipelines.evaluation.embed import EmbedOptions, decode_image
from pipelines.evaluation.evaluator import Evaluator
from pipelines.evaluation.zero_shot_eval import TopKTally, classification_metrics
from pipelines.pools import Pool

CONCEPTS = [
    synthetic.Concept(c, s) for c, s in [("red", "circle"), ("blue", "square"), ("green", "triangle")]
]
CLASSNAMES = [c.label for c in CONCEPTS]
# CLIP_benchmark's templates put the class name where `{c}` is.
TEMPLATES = ["a photo of a {c}.", "a drawing of the {c}.", "{c}"]


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def write_clip_benchmark(root: Path, split: str = "test", per_tar: int = 4, seed: int = 0) -> list[dict]:
    """A dataset as CLIP_benchmark distributes it: classnames.txt, zeroshot_classification_templates.txt and
    {split}/NNNNN.tar holding `{key}.webp` (first tar) or `{key}.jpg` (others) + `{key}.cls`. Adds one
    sample without an image and one without a label. Returns the samples (key, image bytes, label)."""
    (root / split).mkdir(parents=True)
    (root / "classnames.txt").write_text("\n".join(CLASSNAMES) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text("\n".join(TEMPLATES) + "\n")
    images = synthetic.generate(len(CONCEPTS) * 3, seed=seed, concepts=CONCEPTS)
    samples = []
    for i, s in enumerate(images):
        buf = io.BytesIO()
        fmt = "WEBP" if i < per_tar else "JPEG"
        s.image.convert("RGB").save(buf, format=fmt)
        samples.append(
            {
                "key": f"s{i:07d}",
                "ext": fmt.lower().replace("jpeg", "jpg"),
                "image": buf.getvalue(),
                "label": CLASSNAMES.index(s.label),
            }
        )
    for start in range(0, len(samples), per_tar):
        with tarfile.open(root / split / f"{start // per_tar:05d}.tar", "w") as tar:
            for s in samples[start : start + per_tar]:
                _add(tar, f"{s['key']}.{s['ext']}", s["image"])
                _add(tar, f"{s['key']}.cls", f"{s['label']}\n".encode())
            if start == 0:
                _add(tar, "s9999998.cls", b"1\n")  # no image: a counted empty_image drop
                _add(tar, "s9999999.webp", samples[0]["image"])  # no label: a counted unknown_label drop
    return samples


def by_hand(weights_file: Path, tok, samples: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted class, label) per sample: the released weights applied directly, templates filled by hand."""
    model = clip_model.load(str(weights_file))
    transform = clip_model.image_transform(model.config.image_resolution)
    with torch.no_grad():
        classes = []
        for name in CLASSNAMES:
            text = F.normalize(model.encode_text(tok([t.replace("{c}", name) for t in TEMPLATES])), dim=-1)
            classes.append(F.normalize(text.mean(dim=0), dim=-1))
        pixels = torch.stack([transform(decode_image(s["image"])) for s in samples])
        image = F.normalize(model.encode_image(pixels), dim=-1)
    predicted = (image @ torch.stack(classes).T).argmax(dim=-1)
    return predicted, torch.tensor([s["label"] for s in samples])


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    base = tmp_path_factory.mktemp("clip_benchmark")
    ckpt = base / "checkpoint"
    captions = [s.caption for s in synthetic.generate(300, seed=7)] + CLASSNAMES
    tok, _ = make_checkpoint_folder(ckpt, captions, "merges.txt.gz", step=0)
    samples = write_clip_benchmark(base / "wds_shapes")
    predicted, labels = by_hand(ckpt / "openai_fp16.pt", tok, samples)
    return {"base": base, "ckpt": ckpt, "samples": samples, "predicted": predicted, "labels": labels}


def test_layout_is_read_as_distributed(bench):
    layout = read_layout(str(bench["base"] / "wds_shapes"), "test")
    assert layout.name == "shapes" and layout.class_names == CLASSNAMES
    assert layout.templates == ["a photo of a {}.", "a drawing of the {}.", "{}"]
    assert [Path(t).name for t in layout.tars] == ["00000.tar", "00001.tar", "00002.tar"]


def test_job_evaluates_local_and_s3_datasets_against_a_direct_computation(bench, s3_server, tmp_path, capsys):
    bucket = s3_server.make_bucket("clipbench")
    local = bench["base"] / "wds_shapes"
    for f in sorted(p for p in local.rglob("*") if p.is_file()):
        storage.write_bytes_atomic(f"{bucket}/wds_shapes_s3/{f.relative_to(local)}", f.read_bytes())
    out = tmp_path / "out"
    args = [f"checkpoint={bench['ckpt']}", f"output_dir={out}", "embed.use_ray=never"]
    assert load_job().main([*args, f"benchmark.datasets=[{local}, {bucket}/wds_shapes_s3]"]) == 0
    printed = capsys.readouterr().out

    hand_top1 = float((bench["predicted"] == bench["labels"]).float().mean())
    results = json.loads((out / "results.json").read_text())
    rows = {r["dataset"]: r for r in results["benchmark"]}
    assert set(rows) == {"shapes", "shapes_s3"}
    for name, row in rows.items():
        assert row["n"] == len(bench["samples"]) and row["num_templates"] == len(TEMPLATES)
        assert row["top1"] == round(100 * hand_top1, 2), name
        assert row["openai_paper_top1"] is None  # no published number for this dataset/model
        # kept + dropped = samples in the tars
        info = results["data"][f"benchmark_{name}"]
        assert info["dropped"] == {"empty_image": 1, "unknown_label": 1}
        assert info["n_in"] == len(bench["samples"]) + 2
    records = [json.loads(line) for line in (out / "clip_benchmark.jsonl").read_text().splitlines()]
    assert [r["task"] for r in records] == ["zeroshot_classification"] * 2
    assert records[0]["metrics"]["acc1"] == pytest.approx(round(100 * hand_top1, 2) / 100)
    table = (out / "benchmark.txt").read_text()
    assert "openai_paper_top1" in table and table.strip() in printed


def test_a_dataset_not_in_the_layout_is_a_one_line_error(bench, tmp_path, capsys):
    broken = tmp_path / "wds_broken"
    (broken / "test").mkdir(parents=True)
    (broken / "test" / "00000.tar").write_bytes(
        (bench["base"] / "wds_shapes" / "test" / "00000.tar").read_bytes()
    )
    (broken / "classnames.txt").write_text("\n".join(CLASSNAMES))
    args = [f"checkpoint={bench['ckpt']}", f"output_dir={tmp_path / 'out'}", "embed.use_ray=never"]
    assert load_job().main([*args, f"benchmark.datasets=[{broken}]"]) == 2
    assert "zeroshot_classification_templates.txt" in capsys.readouterr().err
    assert load_job().main([*args, f"benchmark.datasets=[{broken}]", "benchmark.split=val"]) == 2
    assert "no val/*.tar" in capsys.readouterr().err


def test_prompts_are_embedded_by_the_pool_not_the_driver(bench, ray_local, monkeypatch):
    """With Ray the driver's model encodes no prompt and no image; the pool's answer is the hand computation."""
    calls = {"text": 0, "image": 0}
    encode_text, encode_image = CLIP.encode_text, CLIP.encode_image

    def counted_text(self, text):
        calls["text"] += 1
        return encode_text(self, text)

    def counted_image(self, image):
        calls["image"] += 1
        return encode_image(self, image)

    monkeypatch.setattr(
        CLIP, "encode_text", counted_text
    )  # this process only: the actors are other processes
    monkeypatch.setattr(CLIP, "encode_image", counted_image)
    cfg = EvalConfig(checkpoint=str(bench["ckpt"]), output_dir=str(bench["base"] / "out_ray"))
    cfg.benchmark.datasets = [str(bench["base"] / "wds_shapes")]
    cfg.embed = EmbedOptions(use_ray="always", pool=Pool(1, 1), cpus_per_actor=0.5, batch_size=4)
    evaluator = Evaluator(cfg)
    layout = read_layout(cfg.benchmark.datasets[0])
    units = [{"kind": "clip_benchmark_tar", "uri": u, "num_classes": 3} for u in layout.tars]
    from pipelines.evaluation.data import EvalSet

    result = evaluator.classify("pool", EvalSet("shards", layout.root, units, CLASSNAMES), layout.templates)
    assert calls == {"text": 0, "image": 0}
    assert result["prompts_embedded_by"] == "ray actor pool" and evaluator.data["pool"]["used_ray"]
    assert evaluator.data["pool"]["dropped"] == {"empty_image": 1, "unknown_label": 1}
    expected = torch.zeros(3, 3, dtype=torch.long)
    expected.index_put_(
        (bench["labels"], bench["predicted"]),
        torch.ones(len(bench["labels"]), dtype=torch.long),
        accumulate=True,
    )
    assert result["confusion"] == expected.tolist()
    # The same set without Ray: the driver embeds (the control for the counters above), same numbers.
    cfg.embed = EmbedOptions(use_ray="never")
    local = evaluator.classify("driver", EvalSet("shards", layout.root, units, CLASSNAMES), layout.templates)
    assert calls["text"] > 0 and calls["image"] > 0 and local["prompts_embedded_by"] == "driver"
    assert local["confusion"] == result["confusion"] and local["top1"] == result["top1"]


def test_streamed_tally_equals_whole_matrix_metrics():
    gen = torch.Generator().manual_seed(3)
    names = [f"c{i}" for i in range(7)]
    logits, labels = torch.randn(50, 7, generator=gen), torch.randint(0, 7, (50,), generator=gen)
    labels[labels == 6] = 5  # a class without examples: accuracy None
    tally = TopKTally(names)
    for start in range(0, 50, 16):
        tally.add(logits[start : start + 16].topk(tally.k, dim=-1).indices, labels[start : start + 16])
    streamed, whole = tally.result(), classification_metrics(logits, labels, names)
    assert streamed["top1"] == pytest.approx(whole["top1"]) and streamed["top5"] == pytest.approx(
        whole["top5"]
    )
    assert {k: v for k, v in streamed.items() if k not in ("top1", "top5")} == {
        k: v for k, v in whole.items() if k not in ("top1", "top5")
    }
    big = TopKTally([str(i) for i in range(1000)])
    big.add(torch.tensor([[3, 1, 2, 4, 5]]), torch.tensor([1]))
    result = big.result()
    assert "confusion" not in result and result["top1"] == 0.0 and result["top5"] == 1.0


def test_published_reference_numbers():
    assert published.model_name(get_config("ViT-B/32", vocab_size=707)) == "ViT-B/32"
    assert published.model_name(get_config("ViT-L/14@336px")) == "ViT-L/14@336px"
    row = published.benchmark_row(
        "imagenet1k",
        "test",
        "ViT-B/32",
        {"top1": 0.61, "top5": 0.9, "mean_per_class": 0.6, "n": 5, "num_classes": 3},
    )
    assert row["openai_paper_top1"] == 63.2 and row["delta_vs_paper"] == -2.2
    assert published.reference_top1("imagenet", "RN50") == 59.6
    assert published.reference_top1("cars", "RN50") is None
    table = published.format_benchmark_table([row])
    assert "63.20" in table and "61.00" in table
