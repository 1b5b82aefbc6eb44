"""`filter_wit(cfg)`: embedding store -> filters -> selection -> `_stats.json` (the funnel) -> report.

Funnel stages (kept + dropped = input in each): `embed` (store reasons: undecodable image, empty caption,
...), `clip_score`, `semantic_dedupe`, `rebalance`. Shards that could not be read are counted apart
(`shards.missing`): their samples are unknown, and a rerun tries them again.
"""

from __future__ import annotations

import json

from pipelines import datasets, storage
from pipelines.filter import dedupe, rebalance, score
from pipelines.filter.config import FilterConfig
from pipelines.filter.embed_job import build_store
from pipelines.filter.filter_job import decide_cut, fit_centroids, run_filters, summarise
from pipelines.filter.select import write_keys, write_summary
from pipelines.filter.store import store_uri
from pipelines.stats import Funnel, write_stats

STAGE_OF = {
    score.LOW_SCORE: "clip_score",
    dedupe.NEAR_DUPLICATE: "semantic_dedupe",
    rebalance.OVER_CAP: "rebalance",
}
STAGES = ("embed", "clip_score", "semantic_dedupe", "rebalance")


def funnel(n_in: int, dropped: dict[str, int]) -> Funnel:
    """The funnel from the final drop reasons (each stage takes what the one before kept)."""
    f = Funnel()
    left = n_in
    for stage in STAGES:
        mine = {r: n for r, n in dropped.items() if STAGE_OF.get(r, "embed") == stage}
        out = left - sum(mine.values())
        f.record(stage, left, out, mine)
        left = out
    return f


def filter_wit(cfg: FilterConfig) -> dict:
    uris = datasets.list_shards(cfg.data_uri, cfg.data_format)
    run = build_store(cfg, uris)
    if cfg.embed_only:
        return {
            "shards": {
                "input": len(uris),
                "committed": len(run.committed),
                "written_now": run.written,
                "resumed": run.skipped,
                "missing": run.missing,
            },
            "store_dropped": run.dropped,
        }
    names = [datasets.shard_name(u) for u in uris]
    store = [store_uri(cfg.output, n) for n in names if n in run.committed]
    summary = summarise(store, cfg.score.bins) if store else None
    cut = decide_cut(cfg, store, summary) if summary else score.no_pair()
    centroids = fit_centroids(cfg, store, cut) if store and cfg.dedupe.enabled else None
    if centroids is not None and len(centroids) == 0:
        centroids = None
    n_in, kept, dropped, dups = 0, 0, {}, []
    seen = set()
    for rec in run_filters(cfg, store, cut, centroids) if store else []:
        seen.add(str(rec["shard"]))
        n_in, kept = n_in + int(rec["n"]), kept + int(rec["kept"])
        for reason, n in json.loads(rec["dropped"]).items():
            dropped[reason] = dropped.get(reason, 0) + n
        dups.extend(json.loads(rec["dups"])[: max(0, 12 - len(dups))])
    for name in names:  # shards with no row (empty, or missing) still get their (empty) selection file
        if name not in seen:
            write_keys(cfg.output, name, [])
    selection = write_summary(cfg.output, cfg.data_uri, len(names), n_in, kept, dict(sorted(dropped.items())))
    f = funnel(n_in, dropped)
    f.check()
    stats = {
        **f.to_dict(),
        "selection": selection,
        "shards": {
            "input": len(names),
            "committed": len(run.committed),
            "written_now": run.written,
            "resumed": run.skipped,
            "missing": run.missing,
        },
        "score_cut": {"threshold": cut.threshold, "tie_key": cut.tie_key},
    }
    write_stats(storage.join(cfg.output, "_stats.json"), stats)
    if cfg.report and summary is not None:
        from pipelines.filter.report import write_report

        stats["report"] = write_report(cfg, summary, cut, dups, stats)
    return stats
