"""jobs/eval_clip.py end to end on a tiny CLIP (random weights: the numbers are not meaningful, the plumbing
is), plus the data readers, the Ray embedding path and bad input."""

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_checkpoint_folder  # shared builder (tests/ is on sys.path under pytest)

import clip_model
from pipelines import shards, synthetic
from pipelines.evaluation.data import EvalDataError, open_eval_set
from pipelines.evaluation.embed import EmbedOptions, embed_eval_set
from pipelines.pools import Pool

ROOT = Path(__file__).resolve().parents[1]
CONCEPTS = [
    synthetic.Concept(c, s) for c, s in [("red", "circle"), ("blue", "square"), ("green", "triangle")]
]


def load_job():
    spec = importlib.util.spec_from_file_location("eval_clip", ROOT / "jobs" / "eval_clip.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_folder(root: Path, n_per_class: int, seed: int) -> Path:
    samples = synthetic.generate(n_per_class * 12, seed=seed, concepts=CONCEPTS)
    counts: dict[str, int] = {}
    for s in samples:
        if counts.get(s.label, 0) >= n_per_class:
            continue
        folder = root / s.label.replace(" ", "_")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{counts.get(s.label, 0):03d}.jpg").write_bytes(synthetic.to_jpeg(s.image))
        counts[s.label] = counts.get(s.label, 0) + 1
    return root


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("eval")
    ckpt = base / "checkpoint"
    captions = [s.caption for s in synthetic.generate(300, seed=7)] + [c.label for c in CONCEPTS]
    # The trainer's checkpoint folder layout: full training state beside the FP16 OpenAI-layout weights.
    tok, model = make_checkpoint_folder(ckpt, captions, "merges.txt.gz", step=0)

    zs = write_folder(base / "zs", 2, seed=1)
    (zs / "red_circle" / "broken.jpg").write_bytes(b"this is not a jpeg")  # counted, skipped
    write_folder(base / "train", 4, seed=2)
    write_folder(base / "test", 2, seed=3)
    images = base / "captioned"
    images.mkdir()
    rng = __import__("random").Random(0)
    lines = []
    for i, s in enumerate(synthetic.generate(4, seed=4, concepts=CONCEPTS)):
        (images / f"{i}.jpg").write_bytes(synthetic.to_jpeg(s.image))
        lines.append(
            {"image": f"captioned/{i}.jpg", "captions": [s.caption, synthetic.caption_for(s.concept, rng)]}
        )
    (base / "captions.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    return {"base": base, "ckpt": ckpt, "model": model, "tok": tok}


def test_end_to_end_report_holds_printed_numbers(setup):
    base, out = setup["base"], setup["base"] / "out"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "jobs" / "eval_clip.py"),
            f"checkpoint={setup['ckpt']}",
            f"output_dir={out}",
            f"zero_shot.data={base / 'zs'}",
            "zero_shot.templates=shapes",
            f"linear_probe.train={base / 'train'}",
            f"linear_probe.test={base / 'test'}",
            "linear_probe.steps_per_decade=1",
            "linear_probe.max_iter=50",
            f"retrieval.data={base / 'captions.jsonl'}",
            "embed.use_ray=never",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=base,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    for name in (
        "results.txt",
        "report.html",
        "zero_shot_per_class.png",
        "zero_shot_confusion.png",
        "linear_probe_per_class.png",
        "retrieval_recall.png",
    ):
        assert (out / name).stat().st_size > 0, name
    rows = re.findall(r"^(zero-shot|linear probe|retrieval)\s+(\S+)\s+([\d.]+)(?:\s|$)", proc.stdout, re.M)
    printed = {(a, b): v for a, b, v in rows}
    assert printed["zero-shot", "top1"] == f"{100 * results['zero_shot']['top1']:.2f}"
    assert printed["zero-shot", "top5"] == f"{100 * results['zero_shot']['top5']:.2f}"
    assert printed["linear probe", "top1"] == f"{100 * results['linear_probe']['accuracy']:.2f}"
    assert (
        printed["retrieval", "image_to_text_R@5"] == f"{100 * results['retrieval']['image_to_text_R@5']:.2f}"
    )
    assert (
        printed["retrieval", "text_to_image_R@1"] == f"{100 * results['retrieval']['text_to_image_R@1']:.2f}"
    )
    assert (out / "results.txt").read_text().strip() in proc.stdout
    # Confusion matrix and per-class numbers add up; the unreadable image is a counted skip.
    zs = results["zero_shot"]
    assert zs["n"] == 6 and sum(map(sum, zs["confusion"])) == 6 and zs["num_templates"] == 5
    assert results["data"]["zero_shot"]["dropped"] == {"unreadable_image": 1}
    assert "zero_shot: 6/7 images used (dropped: unreadable_image=1)" in proc.stdout
    assert results["retrieval"]["num_texts"] == 8 and results["retrieval"]["text_to_image_R@10"] == 1.0
    assert results["linear_probe"]["n_test"] == 6
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 4 and "src='zero_shot" not in html


def test_features_cached_and_ray_path_matches_in_process(setup, ray_local, tmp_path):
    eval_set = open_eval_set(str(setup["base"] / "zs"), "classification")
    assert eval_set.class_names == ["blue square", "green triangle", "red circle"]
    local = embed_eval_set(
        eval_set, setup["model"], opts=EmbedOptions(use_ray="never", cache_dir=str(tmp_path))
    )
    again = embed_eval_set(
        eval_set, setup["model"], opts=EmbedOptions(use_ray="never", cache_dir=str(tmp_path))
    )
    assert again.from_cache and torch.equal(again.image_features, local.image_features)
    # Ray actors load the checkpoint themselves (fp16 weights, so features agree to fp16 precision).
    opts = EmbedOptions(use_ray="always", pool=Pool(1, 1), cpus_per_actor=0.5, batch_size=4)
    remote = embed_eval_set(eval_set, str(setup["ckpt"]), opts=opts)
    assert remote.used_ray and remote.ids == local.ids and torch.equal(remote.labels, local.labels)
    assert remote.dropped == {"unreadable_image": 1}
    assert torch.allclose(remote.image_features, local.image_features, atol=5e-2, rtol=5e-2)


def test_shard_inputs_with_labels_and_captions(setup, tmp_path):
    samples = list(synthetic.synthetic_shard_samples(6, seed=5, concepts=CONCEPTS))
    samples[2]["jpg"] = b"\x00broken"
    shards.write_dataset(samples, str(tmp_path), samples_per_shard=4, formats=("webdataset", "parquet"))
    labelled = open_eval_set(str(tmp_path), "classification")
    assert set(labelled.class_names) <= {c.label for c in CONCEPTS} and len(labelled.units) == 2
    emb = embed_eval_set(labelled, setup["model"], opts=EmbedOptions(use_ray="never"))
    assert emb.n_in == 6 and len(emb.ids) == 5 and emb.dropped == {"unreadable_image": 1}
    names = labelled.class_names
    assert [names[i] for i in emb.labels] == [s["json"]["label"] for s in samples if s["key"] in emb.ids]
    caps = open_eval_set(str(tmp_path / "00000.parquet"), "retrieval")
    emb = embed_eval_set(caps, setup["model"], setup["tok"], opts=EmbedOptions(use_ray="never"))
    assert emb.captions == [samples[i]["txt"] for i in (0, 1, 3)] and emb.text_features.shape == (3, 128)


def test_bad_input_gives_clear_messages(setup, tmp_path, capsys):
    job = load_job()
    base = setup["base"]
    common = [f"checkpoint={setup['ckpt']}", f"output_dir={tmp_path / 'out'}", "embed.use_ray=never"]

    empty = write_folder(tmp_path / "with_empty", 1, seed=1)
    (empty / "purple_star").mkdir()
    assert job.main([*common, f"zero_shot.data={empty}"]) == 2
    assert "purple_star" in capsys.readouterr().err

    nameless = write_folder(tmp_path / "nameless", 1, seed=1)
    (nameless / "red_circle").rename(nameless / "___")
    assert job.main([*common, f"zero_shot.data={nameless}"]) == 2
    assert "tokenize to nothing" in capsys.readouterr().err

    bad = {k: v.clone() for k, v in clip_model.to_openai_state_dict(setup["model"]).items()}
    bad["ln_final.weight"] = torch.ones(64)
    torch.save(bad, tmp_path / "bad.pt")
    bad_common = [f"checkpoint={tmp_path / 'bad.pt'}", f"tokenizer={setup['ckpt'] / 'merges.txt.gz'}"]
    assert job.main([*bad_common, f"zero_shot.data={base / 'zs'}", f"output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "bad.pt" in err and "shape" in err

    other_tok = clip_model.Tokenizer.train(["a b c d"] * 3, 520, tmp_path / "other.txt.gz")
    assert other_tok.vocab_size != setup["tok"].vocab_size
    assert job.main([*common, f"tokenizer={tmp_path / 'other.txt.gz'}", f"zero_shot.data={base / 'zs'}"]) == 2
    assert "tokens but the model's token embedding has" in capsys.readouterr().err

    with pytest.raises(EvalDataError, match="no class sub-folders"):
        open_eval_set(str(tmp_path / "out"), "classification") if (tmp_path / "out").mkdir() is None else None
    with pytest.raises(SystemExit):
        job.main([*common, "zero_shot.dta=x"])
    assert "zero_shot.dta" in capsys.readouterr().err
