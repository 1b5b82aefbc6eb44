"""Zero-shot classifier and metrics on constructed encoders whose right answers are known without training."""

import json

import pytest
import torch
import torch.nn.functional as F

from clip_model.zero_shot import (
    DEFAULT_TEMPLATES,
    TASK_TEMPLATES,
    ZeroShotError,
    build_zero_shot_classifier,
    empty_class_names,
    get_templates,
    load_class_names,
    load_templates,
    predict,
)
from pipelines.evaluation.zero_shot_eval import classification_metrics, evaluate_zero_shot

CLASSES = ["cat", "dog", "bird", "fish", "horse", "cow", "frog", "ant"]
D = 16


class WordTokenizer:
    """Stand-in tokenizer: one id per known word, sot = vocab, eot = vocab + 1 (the largest id)."""

    def __init__(self, words):
        self.ids = {w: i + 1 for i, w in enumerate(sorted(set(words)))}
        self.sot_token, self.eot_token = len(self.ids) + 1, len(self.ids) + 2

    def __call__(self, texts):
        texts = [texts] if isinstance(texts, str) else texts
        out = torch.zeros(len(texts), 77, dtype=torch.long)
        for i, t in enumerate(texts):
            ids = [
                self.ids[w] for w in t.lower().replace(".", " ").replace(",", " ").split() if w in self.ids
            ]
            row = [self.sot_token, *ids, self.eot_token]
            out[i, : len(row)] = torch.tensor(row)
        return out


class ConstructedCLIP(torch.nn.Module):
    """encode_text sums fixed word vectors (class words dominate); encode_image returns the class direction
    stored in the image 'pixels' (image = class index in a [N] tensor) plus small noise."""

    def __init__(self, tokenizer, class_dirs, template_words_scale=0.3, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.tok = tokenizer
        self.word_vectors = torch.nn.Parameter(
            template_words_scale * torch.randn(tokenizer.eot_token + 1, D, generator=g)
        )
        with torch.no_grad():
            for name, direction in class_dirs.items():
                self.word_vectors[tokenizer.ids[name]] = direction
            self.word_vectors[tokenizer.sot_token] = 0
            self.word_vectors[tokenizer.eot_token] = 0
        self.class_dirs = torch.stack(list(class_dirs.values()))

    def encode_text(self, tokens):
        return self.word_vectors[tokens].sum(dim=1) - self.word_vectors[0] * (tokens == 0).sum(
            dim=1, keepdim=True
        )

    def encode_image(self, images):
        g = torch.Generator().manual_seed(int(images.sum()))
        return self.class_dirs[images] + 0.05 * torch.randn(len(images), D, generator=g)


def make_model(templates):
    words = CLASSES + [w for t in templates for w in t.replace("{}", " ").replace(".", " ").split()]
    tok = WordTokenizer(words)
    dirs = F.normalize(torch.randn(len(CLASSES), D, generator=torch.Generator().manual_seed(1)), dim=-1) * 5
    return ConstructedCLIP(tok, dict(zip(CLASSES, dirs))), tok


def test_aligned_encoders_score_100_and_shuffled_near_chance():
    templates = get_templates("default")
    model, tok = make_model(templates)
    weights = build_zero_shot_classifier(model, tok, CLASSES, templates, batch_size=37)
    assert weights.shape == (D, len(CLASSES))
    assert torch.allclose(weights.norm(dim=0), torch.ones(len(CLASSES)), atol=1e-5)
    labels = torch.arange(len(CLASSES)).repeat(25)
    feats = model.encode_image(labels)
    result = evaluate_zero_shot(feats, labels, weights, CLASSES)
    assert result["top1"] == 1.0 and result["top5"] == 1.0 and result["mean_per_class"] == 1.0
    assert all(v["accuracy"] == 1.0 and v["n"] == 25 for v in result["per_class"].values())
    assert torch.equal(torch.tensor(result["confusion"]), 25 * torch.eye(len(CLASSES), dtype=torch.long))
    assert torch.equal(predict(feats, weights, k=1)[:, 0], labels)

    # Images whose class directions are permuted across many random draws: accuracy averages to chance.
    accs = []
    for seed in range(30):
        perm = torch.randperm(len(CLASSES), generator=torch.Generator().manual_seed(seed))
        accs.append(evaluate_zero_shot(model.encode_image(perm[labels]), labels, weights, CLASSES)["top1"])
    mean_acc = sum(accs) / len(accs)
    assert abs(mean_acc - 1 / len(CLASSES)) < 0.06, mean_acc


def test_ensemble_is_mean_of_normalised_then_renormalised():
    templates = ["a photo of a {}.", "a drawing of the {}.", "itap of my {}."]
    model, tok = make_model(templates)
    weights = build_zero_shot_classifier(model, tok, CLASSES[:3], templates, batch_size=2)
    for c, name in enumerate(CLASSES[:3]):
        embs = [model.encode_text(tok([t.format(name)]))[0] for t in templates]
        embs = [e / e.norm() for e in embs]
        mean = sum(embs) / len(embs)
        expected = mean / mean.norm()
        assert torch.allclose(weights[:, c], expected, atol=1e-5)
        # Not the same as normalising the sum of raw embeddings (so the test can tell the two apart).
    raw = [model.encode_text(tok([t.format(CLASSES[0])]))[0] for t in templates]
    assert not torch.allclose(F.normalize(sum(raw), dim=0), weights[:, 0], atol=1e-4)


def test_class_name_that_tokenizes_to_nothing_is_a_clear_error():
    model, tok = make_model(["a photo of a {}."])
    assert empty_class_names(tok, ["cat", "???", "dog", ""]) == ["???", ""]
    with pytest.raises(ZeroShotError, match=r"tokenize to nothing.*\?\?\?"):
        build_zero_shot_classifier(model, tok, ["cat", "???"], ["a photo of a {}."])


def test_templates_from_files_and_sets(tmp_path):
    assert len(DEFAULT_TEMPLATES) >= 40 and all("{}" in t for t in DEFAULT_TEMPLATES)
    for name in ("satellite", "textures", "digits", "pets", "food"):
        assert get_templates(name) == TASK_TEMPLATES[name]
    txt = tmp_path / "t.txt"
    txt.write_text("# my prompts\na photo of a {}.\n\nart of the {}.\n")
    assert load_templates(txt) == ["a photo of a {}.", "art of the {}."]
    js = tmp_path / "t.json"
    js.write_text(json.dumps({"templates": ["a {} texture."]}))
    assert get_templates(str(js)) == ["a {} texture."]
    bad = tmp_path / "bad.txt"
    bad.write_text("a photo without slot\n")
    with pytest.raises(ZeroShotError, match="slot"):
        load_templates(bad)
    with pytest.raises(ZeroShotError, match="unknown template set"):
        get_templates("no-such-set")
    names = tmp_path / "names.json"
    names.write_text(json.dumps({"n01": "tench", "n02": "goldfish"}))
    assert load_class_names(names) == {"n01": "tench", "n02": "goldfish"}


def test_metrics_hand_computed():
    logits = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.5, 0.4, 0.1], [0.1, 0.2, 0.7]])
    labels = torch.tensor([0, 1, 1, 0])
    m = classification_metrics(logits, labels, ["a", "b", "c"], ks=(1, 2))
    assert m["top1"] == 0.5  # rows 0 and 1 right
    assert m["top2"] == 0.75  # row 2: label 1 is second; row 3: label 0 is third
    assert m["confusion"] == [[1, 0, 1], [1, 1, 0], [0, 0, 0]]
    assert m["per_class"]["a"]["accuracy"] == 0.5 and m["per_class"]["c"]["accuracy"] is None
    assert m["mean_per_class"] == 0.5
