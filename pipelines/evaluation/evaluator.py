"""The evaluation job's work (jobs/eval_clip.py is its thin entry point): `Evaluator` runs zero-shot
classification, CLIP_benchmark datasets, the linear probe and retrieval for one checkpoint; `run` collects
their results; `write_report_to` writes them (local folder or s3:// prefix).

Zero-shot with Ray (large sets, or `embed.use_ray=always`): the prompts and the images are embedded by the
actor pool (zero_shot_pool.py) and the driver keeps the class matrix and streamed counts. Without Ray (small
sets): the driver's model embeds both, and the image features are cached on disk.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from clip_model.zero_shot import (
    build_zero_shot_classifier,
    check_zero_shot_inputs,
    get_templates,
    load_class_names,
    zero_shot_logits,
)
from pipelines import storage
from pipelines.config import ConfigError, config_to_dict

from . import clip_benchmark, published
from .config import EvalConfig
from .data import EvalDataError, EvalSet, open_eval_set
from .embed import (
    EmbeddedSet,
    embed_eval_set,
    find_merges,
    find_weights,
    load_model,
    load_tokenizer,
    needs_ray,
    resolve_device,
)
from .examples import classification_examples, retrieval_examples
from .linear_probe import linear_probe
from .report import write_report
from .retrieval import retrieval_metrics
from .zero_shot_eval import classification_metrics, evaluate_zero_shot
from .zero_shot_pool import pool_classifier, score_with_pool


def local_copy(path: str) -> str:
    """A path the file readers of clip_model take: an s3:// object copied once per process, else `path`
    (a template-set name such as "default" stays a name)."""
    return storage.local_file(path) if storage.is_s3(path) else path


class Evaluator:
    """Holds the model, tokenizer and options; embeds each set once (cached on disk)."""

    def __init__(self, cfg: EvalConfig):
        self.cfg = cfg
        self.device = resolve_device(cfg.embed.device)
        self.weights = find_weights(cfg.checkpoint)  # local or s3://: what every embedding actor reads
        self.model = load_model(cfg.checkpoint, self.device)
        merges = cfg.tokenizer or find_merges(cfg.checkpoint)
        self.tokenizer = load_tokenizer(merges, self.model)
        self.merges = merges
        if not cfg.embed.cache_dir and not storage.is_s3(cfg.output_dir):
            # The feature cache is local (no cache when the report goes to S3: nodes share no disk).
            cfg.embed.cache_dir = str(Path(cfg.output_dir) / "feature_cache")
        self.data: dict[str, dict] = {}

    def _connect(self) -> None:
        import ray

        from pipelines.ray_connect import connect

        if not ray.is_initialized():
            connect(self.cfg.ray_address or None, log_to_driver=False)

    def embed(self, name: str, eval_set: EvalSet) -> EmbeddedSet:
        if needs_ray(eval_set, self.cfg.embed):
            self._connect()
            # Actors load the weights themselves; the tokenizer travels as its merges path.
            source, tok = self.cfg.checkpoint, self.merges
        else:
            source, tok = self.model, self.tokenizer
        result = embed_eval_set(eval_set, source, tok, self.cfg.embed, cache_name=name)
        self.data[name] = {
            "source": eval_set.source,
            "n_in": result.n_in,
            "n_used": len(result.ids),
            "dropped": result.dropped,
            "num_captions": len(result.captions),
            "used_ray": result.used_ray,
            "from_cache": result.from_cache,
        }
        return result

    def classify(self, name: str, eval_set: EvalSet, templates: list[str]) -> dict:
        """Zero-shot metrics of a labelled set: prompts and images through the actor pool when the set goes
        through Ray, else on the driver."""
        templates = check_zero_shot_inputs(self.tokenizer, eval_set.class_names, templates)
        if not needs_ray(eval_set, self.cfg.embed):
            weights = build_zero_shot_classifier(
                self.model, self.tokenizer, eval_set.class_names, templates, device=self.device
            )
            embedded = self.embed(name, eval_set)
            result = evaluate_zero_shot(
                embedded.image_features, embedded.labels, weights, eval_set.class_names
            )
            result.update(num_templates=len(templates), prompts_embedded_by="driver")
            # The report's sheet of held-out images with their top-5 predictions.
            logits = zero_shot_logits(embedded.image_features, weights)
            result["examples"] = classification_examples(eval_set, embedded, logits, eval_set.class_names)
            return result
        self._connect()
        opts = self.cfg.embed
        weights = pool_classifier(self.cfg.checkpoint, self.merges, eval_set.class_names, templates, opts)
        scored = score_with_pool(eval_set, self.cfg.checkpoint, weights, opts)
        self.data[name] = {
            "source": eval_set.source,
            "n_in": scored.n_in,
            "n_used": scored.result["n"],
            "dropped": scored.dropped,
            "num_captions": 0,
            "used_ray": True,
            "from_cache": False,
        }
        scored.result.update(num_templates=len(templates), prompts_embedded_by="ray actor pool")
        return scored.result

    def zero_shot(self) -> dict:
        zs = self.cfg.zero_shot
        names = load_class_names(local_copy(zs.class_names)) if zs.class_names else None
        eval_set = open_eval_set(zs.data, "classification", zs.label_field, names, selection_uri=zs.selection)
        return self.classify("zero_shot", eval_set, get_templates(local_copy(zs.templates)))

    def benchmark(self) -> list[dict]:
        """Each CLIP_benchmark dataset with its own class names and templates; one comparison row each."""
        bc = self.cfg.benchmark
        model = bc.model or published.model_name(self.model.config)
        rows = []
        for root in bc.datasets:
            layout = clip_benchmark.read_layout(root, bc.split)
            units = [
                {"kind": "clip_benchmark_tar", "uri": uri, "num_classes": len(layout.class_names)}
                for uri in layout.tars
            ]
            eval_set = EvalSet("shards", layout.root, units, layout.class_names)
            name = (
                layout.name
                if layout.name not in {r["dataset"] for r in rows}
                else f"{layout.name}_{len(rows)}"
            )
            result = self.classify(f"benchmark_{name}", eval_set, layout.templates)
            rows.append(published.benchmark_row(name, bc.split, model, result))
        return rows

    def linear_probe(self) -> dict:
        lp = self.cfg.linear_probe
        if not lp.test:
            raise EvalDataError("linear_probe.train is set but linear_probe.test is not")
        train_set = open_eval_set(
            lp.train, "classification", lp.label_field, selection_uri=lp.train_selection
        )
        sets = {"linear_probe_train": train_set, "linear_probe_test": None, "linear_probe_val": None}
        for key, path, chosen in (
            ("linear_probe_test", lp.test, lp.test_selection),
            ("linear_probe_val", lp.val, lp.val_selection),
        ):
            if path:
                s = open_eval_set(path, "classification", lp.label_field, list(train_set.class_names),
                                  selection_uri=chosen)  # fmt: skip
                if s.kind == "folder" and s.class_names != train_set.class_names:
                    raise EvalDataError(
                        f"{path}: classes {s.class_names} differ from the training set's {train_set.class_names}"
                    )
                sets[key] = s
        train = self.embed("linear_probe_train", train_set)
        test = self.embed("linear_probe_test", sets["linear_probe_test"])
        val = self.embed("linear_probe_val", sets["linear_probe_val"]) if sets["linear_probe_val"] else None
        n_classes = len(train_set.class_names)
        result = linear_probe(
            train.image_features,
            train.labels,
            test.image_features,
            test.labels,
            num_classes=n_classes,
            val_x=val.image_features if val else None,
            val_y=val.labels if val else None,
            val_fraction=lp.val_fraction,
            seed=lp.seed,
            max_iter=lp.max_iter,
            steps_per_decade=lp.steps_per_decade,
        )
        preds = torch.tensor(result.pop("predictions"), dtype=torch.long)
        per_class = classification_metrics(
            F.one_hot(preds, n_classes).float(), test.labels, train_set.class_names, ks=(1,)
        )
        result.update(per_class=per_class["per_class"], confusion=per_class["confusion"])
        return result

    def retrieval(self) -> dict:
        rt = self.cfg.retrieval
        eval_set = open_eval_set(rt.data, "retrieval", captions_field=rt.captions_field, selection_uri=rt.selection)
        embedded = self.embed("retrieval", eval_set)
        result = retrieval_metrics(
            embedded.image_features, embedded.text_features, embedded.text_image_index, ks=tuple(rt.ks)
        )
        result["examples"] = retrieval_examples(eval_set, embedded)  # the report's query -> top images sheet
        return result


def run(cfg: EvalConfig) -> dict:
    if not cfg.checkpoint:
        raise ConfigError(
            "checkpoint= is required (trainer checkpoint folder, state dict or TorchScript file)"
        )
    wanted = {
        "zero_shot": cfg.zero_shot.data,
        "benchmark": cfg.benchmark.datasets,
        "linear_probe": cfg.linear_probe.train,
        "retrieval": cfg.retrieval.data,
    }
    if not any(wanted.values()):
        raise ConfigError(
            "nothing to evaluate: set zero_shot.data, benchmark.datasets, linear_probe.train/test or "
            "retrieval.data"
        )
    start = time.time()
    evaluator = Evaluator(cfg)
    results: dict = {
        "checkpoint": cfg.checkpoint,
        "weights": evaluator.weights,
        "tokenizer": evaluator.merges,
        "config": config_to_dict(cfg),
    }
    for name, path in wanted.items():
        if path:
            results[name] = getattr(evaluator, name)()
    results["data"] = evaluator.data
    results["seconds"] = round(time.time() - start, 2)
    return results


def _write_local(results: dict, out_dir: str) -> dict[str, str]:
    """The report, plus for CLIP_benchmark datasets the comparison table and CLIP_benchmark's result records."""
    files = write_report(results, out_dir)
    rows = results.get("benchmark")
    if rows:
        out = Path(out_dir)
        (out / "benchmark.txt").write_text(published.format_benchmark_table(rows) + "\n", encoding="utf-8")
        records = [published.clip_benchmark_record(r, results["checkpoint"]) for r in rows]
        (out / "clip_benchmark.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in records), encoding="utf-8"
        )
        files.update(
            {
                "benchmark.txt": str(out / "benchmark.txt"),
                "clip_benchmark.jsonl": str(out / "clip_benchmark.jsonl"),
            }
        )
    return files


def write_report_to(results: dict, output_dir: str) -> dict[str, str]:
    """The report files into `output_dir`, a local folder or an s3:// prefix (written locally, then uploaded)."""
    if not storage.is_s3(output_dir):
        return _write_local(results, output_dir)
    with tempfile.TemporaryDirectory(prefix="eval_report_") as tmp:
        local = _write_local(results, tmp)
        files = {}
        for name, path in local.items():
            files[name] = storage.join(output_dir, name)
            storage.write_bytes_atomic(files[name], Path(path).read_bytes())
    return files
