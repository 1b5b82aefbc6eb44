"""Evaluate a CLIP checkpoint: zero-shot classification (prompt ensembles), linear probe, image-text retrieval.

    python jobs/eval_clip.py checkpoint=s3://bucket/runs/train/checkpoint_x tokenizer=merges.txt.gz \
        zero_shot.data=data/eval_folder zero_shot.templates=textures \
        linear_probe.train=data/train linear_probe.test=data/test retrieval.data=data/captions.jsonl

Writes results.json, results.txt, PNG plots and report.html to `output_dir` and prints the table. Every path
(checkpoint, tokenizer, data, output_dir) may be a local path or an s3:// URI; on a cluster use s3:// (the
embedding actors run on other nodes and read the checkpoint and the images themselves).
Large sets are embedded with Ray Data (joins a running cluster, else starts a local one); small sets in-process.
Shard sets take the rows a filter selected: `zero_shot.selection=`, `retrieval.selection=`,
`linear_probe.{train,test,val}_selection=` (pipelines/selection.py).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python jobs/eval_clip.py` from anywhere

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from clip_model.zero_shot import ZeroShotError, build_zero_shot_classifier, get_templates, load_class_names  # noqa: E402
from pipelines import progress, storage  # noqa: E402
from pipelines.config import ConfigError, config_to_dict, parse_args  # noqa: E402
from pipelines.evaluation.config import EvalConfig  # noqa: E402
from pipelines.evaluation.data import EvalDataError, EvalSet, open_eval_set  # noqa: E402
from pipelines.evaluation.embed import (  # noqa: E402
    EmbeddedSet,
    EvalModelError,
    embed_eval_set,
    find_merges,
    find_weights,
    load_model,
    load_tokenizer,
    needs_ray,
    resolve_device,
)
from pipelines.evaluation.linear_probe import linear_probe  # noqa: E402
from pipelines.evaluation.report import format_table, write_report  # noqa: E402
from pipelines.evaluation.retrieval import retrieval_metrics  # noqa: E402
from pipelines.evaluation.zero_shot_eval import classification_metrics, evaluate_zero_shot  # noqa: E402


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

    def embed(self, name: str, eval_set: EvalSet) -> EmbeddedSet:
        if needs_ray(eval_set, self.cfg.embed):
            import ray

            from pipelines.ray_connect import connect

            if not ray.is_initialized():
                connect(self.cfg.ray_address or None, log_to_driver=False)
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

    def zero_shot(self) -> dict:
        zs = self.cfg.zero_shot
        names = load_class_names(local_copy(zs.class_names)) if zs.class_names else None
        eval_set = open_eval_set(zs.data, "classification", zs.label_field, names, selection_uri=zs.selection)
        templates = get_templates(local_copy(zs.templates))
        weights = build_zero_shot_classifier(
            self.model, self.tokenizer, eval_set.class_names, templates, device=self.device
        )
        embedded = self.embed("zero_shot", eval_set)
        result = evaluate_zero_shot(embedded.image_features, embedded.labels, weights, eval_set.class_names)
        result["num_templates"] = len(templates)
        return result

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
        eval_set = open_eval_set(
            rt.data, "retrieval", captions_field=rt.captions_field, selection_uri=rt.selection
        )
        embedded = self.embed("retrieval", eval_set)
        return retrieval_metrics(
            embedded.image_features, embedded.text_features, embedded.text_image_index, ks=tuple(rt.ks)
        )


def run(cfg: EvalConfig) -> dict:
    if not cfg.checkpoint:
        raise ConfigError(
            "checkpoint= is required (trainer checkpoint folder, state dict or TorchScript file)"
        )
    wanted = {
        "zero_shot": cfg.zero_shot.data,
        "linear_probe": cfg.linear_probe.train,
        "retrieval": cfg.retrieval.data,
    }
    if not any(wanted.values()):
        raise ConfigError(
            "nothing to evaluate: set zero_shot.data, linear_probe.train/test or retrieval.data"
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


def write_report_to(results: dict, output_dir: str) -> dict[str, str]:
    """write_report into `output_dir`, a local folder or an s3:// prefix (written locally, then uploaded)."""
    if not storage.is_s3(output_dir):
        return write_report(results, output_dir)
    with tempfile.TemporaryDirectory(prefix="eval_report_") as tmp:
        local = write_report(results, tmp)
        files = {}
        for name, path in local.items():
            files[name] = storage.join(output_dir, name)
            storage.write_bytes_atomic(files[name], Path(path).read_bytes())
    return files


def main(argv: list[str] | None = None) -> int:
    progress.setup()  # plain job logs: no escape sequences, one line per finished stage
    cfg = parse_args(EvalConfig, argv, description=__doc__)
    try:
        results = run(cfg)
    except (ConfigError, EvalDataError, EvalModelError, ZeroShotError) as e:
        print(f"eval_clip: error: {e}", file=sys.stderr)
        return 2
    files = write_report_to(results, cfg.output_dir)
    print(format_table(results))
    for name, info in results["data"].items():
        drops = ", ".join(f"{k}={v}" for k, v in info["dropped"].items()) or "none"
        print(f"{name}: {info['n_used']}/{info['n_in']} images used (dropped: {drops})")
    print(f"report: {files['report.html']}  results: {files['results.json']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
