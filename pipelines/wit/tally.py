"""Counts that travel as data: tally rows beside the data rows of a Ray Data stream.

A stage that drops rows cannot leave its counts in the rows it keeps, and a side effect (a message to a
stats actor) is counted twice when Ray retries the task. So each stage appends a few *tally rows* to its
output batch: `tally_stage`, `tally_key` ("in", "out" or "dropped:<reason>") and `tally_n`, with every
data column null. Data rows have `tally_stage` null. Later stages pass tally rows through untouched, and
the funnel is a Ray Data aggregation over the stage's output (`funnel_of`): a retried task replaces its
output, tallies included, so it changes nothing. A batch costs a handful of tally rows, whatever its size.
"""

from __future__ import annotations

from collections.abc import Mapping

import pyarrow as pa
import pyarrow.compute as pc

from pipelines.stats import Funnel

TALLY_FIELDS = [
    pa.field("tally_stage", pa.string()),
    pa.field("tally_key", pa.string()),
    pa.field("tally_n", pa.int64()),
]
TALLY_NAMES = [f.name for f in TALLY_FIELDS]


def tally_schema(data: pa.Schema) -> pa.Schema:
    """`data` with the tally columns appended (the schema of a stage's output blocks)."""
    return pa.schema([*(f for f in data if f.name not in TALLY_NAMES), *TALLY_FIELDS])


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """`table` with exactly `schema`'s columns, in order; missing ones are null."""
    cols = [
        table.column(f.name).cast(f.type)
        if f.name in table.column_names
        else pa.nulls(table.num_rows, f.type)
        for f in schema
    ]
    return pa.Table.from_arrays(cols, schema=schema)


def tally_table(
    schema: pa.Schema, stage: str, n_in: int, n_out: int, dropped: Mapping[str, int] | None = None
) -> pa.Table:
    """Tally rows of one stage call, with `schema` (data columns null)."""
    entries = [("in", n_in), ("out", n_out)]
    entries += [(f"dropped:{r}", n) for r, n in sorted((dropped or {}).items()) if n]
    rows = pa.table(
        {
            "tally_stage": [stage] * len(entries),
            "tally_key": [k for k, _ in entries],
            "tally_n": pa.array([int(n) for _, n in entries], pa.int64()),
        }
    )
    return conform(rows, tally_schema(schema))


def split(batch: pa.Table) -> tuple[pa.Table, pa.Table]:
    """(data rows without the tally columns, tally rows) of a stage's output batch."""
    if "tally_stage" not in batch.column_names:
        return batch, batch.schema.empty_table().append_column("tally_stage", pa.array([], pa.string()))
    is_tally = pc.is_valid(batch.column("tally_stage"))
    return batch.filter(pc.invert(is_tally)).drop_columns(TALLY_NAMES), batch.filter(is_tally)


def emit(
    rows: pa.Table,
    passed: pa.Table | None,
    stage: str,
    n_in: int,
    dropped: Mapping[str, int] | None = None,
) -> pa.Table:
    """A stage's output batch: its kept `rows`, the tally rows it received (`passed`), and its own."""
    schema = tally_schema(rows.schema)
    parts = [conform(rows, schema)]
    if passed is not None and passed.num_rows:
        parts.append(conform(passed, schema))
    parts.append(tally_table(rows.schema, stage, n_in, rows.num_rows, dropped))
    return pa.concat_tables(parts)


def data_rows(batch: pa.Table) -> pa.Table:
    """Ray Data UDF: only the data rows, without tally columns."""
    return split(batch)[0]


def tally_rows(batch: pa.Table) -> pa.Table:
    """Ray Data UDF: only the tally columns of the tally rows."""
    return split(batch)[1].select(TALLY_NAMES)


def funnel_from_totals(totals: pa.Table) -> Funnel:
    """A Funnel from aggregated (tally_stage, tally_key, tally_n) rows."""
    stages: dict[str, dict] = {}
    for stage, key, n in zip(*(totals.column(c).to_pylist() for c in TALLY_NAMES)):
        entry = stages.setdefault(stage, {"in": 0, "out": 0, "dropped": {}})
        if key.startswith("dropped:"):
            entry["dropped"][key.split(":", 1)[1]] = int(n)
        else:
            entry[key] = int(n)
    return Funnel.from_dict({"stages": stages})


def funnel_of(ds) -> Funnel:  # ds: ray.data.Dataset
    """The funnel of every stage whose tallies are in `ds`: a groupby-sum over its tally rows."""
    tallies = ds.map_batches(tally_rows, batch_format="pyarrow")
    df = tallies.groupby(["tally_stage", "tally_key"], num_partitions=1).sum("tally_n").to_pandas()
    if not len(df):
        return Funnel()
    return funnel_from_totals(pa.Table.from_pandas(df, preserve_index=False).rename_columns(TALLY_NAMES))


# ---------------------------------------------------------------- tallies inside a (key, count) table

# For jobs whose rows are already (key, count) pairs summed by a groupby (the query list's word and page-view
# counts), a funnel travels as extra keys that no real key can equal (real keys never hold a NUL byte).
KEY_PREFIX = "\x00"


def funnel_keys(funnel: Funnel) -> dict[str, int]:
    """`funnel` as {key: n} entries to append to a (key, count) table; `keyed_funnel` reads them back."""
    out: dict[str, int] = {}
    for stage, e in funnel.to_dict()["stages"].items():
        out[f"{KEY_PREFIX}{stage}{KEY_PREFIX}in"] = e["in"]
        out[f"{KEY_PREFIX}{stage}{KEY_PREFIX}out"] = e["out"]
        for reason, n in e["dropped"].items():
            out[f"{KEY_PREFIX}{stage}{KEY_PREFIX}dropped:{reason}"] = n
    for group, counts in funnel.to_dict()["counters"].items():
        for name, n in counts.items():
            out[f"{KEY_PREFIX}#{group}{KEY_PREFIX}{name}"] = n
    return out


def is_tally_key(keys: pa.ChunkedArray | pa.Array) -> pa.ChunkedArray | pa.Array:
    return pc.starts_with(keys, KEY_PREFIX)


def keyed_funnel(keys: list[str], values: list[int]) -> Funnel:
    """The Funnel encoded by the tally `keys` (others are ignored) and their summed `values`."""
    stages: dict[str, dict] = {}
    counters: dict[str, dict[str, int]] = {}
    for key, n in zip(keys, values):
        if not key.startswith(KEY_PREFIX):
            continue
        name, item = key[1:].split(KEY_PREFIX, 1)
        if name.startswith("#"):
            counters.setdefault(name[1:], {})[item] = int(n)
            continue
        entry = stages.setdefault(name, {"in": 0, "out": 0, "dropped": {}})
        if item.startswith("dropped:"):
            entry["dropped"][item.split(":", 1)[1]] = int(n)
        else:
            entry[item] = int(n)
    return Funnel.from_dict({"stages": stages, "counters": counters})
