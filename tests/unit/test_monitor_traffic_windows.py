"""Traffic window reader: features from hand-written window files, the serving app's files read
back, merging, ordering, and the errors a bad file raises."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raymoe.monitor.drift import FEATURES
from raymoe.monitor.traffic_windows import list_windows, merge_windows, read_window

SCHEMA = pa.schema(
    [
        ("prompt_length", pa.int32()),
        ("output_length", pa.int32()),
        ("mean_logprob", pa.float64()),
        ("prompt_token_buckets", pa.list_(pa.int32())),
        ("embedding", pa.list_(pa.float32())),
        ("adapter", pa.string()),
        ("finished_at", pa.float64()),
    ]
)


def write_window(path, rows, **meta_overrides):
    """A window file per the format, written without the serving app's code."""
    meta = {
        "format": 1,
        "start": 10.0,
        "end": 70.0,
        "model": "tiny",
        "vocab_size": 10,
        "token_buckets": 4,
        "sample_rate": 0.5,
        "num_requests_seen": 2 * len(rows),
        "num_sampled": len(rows),
        "expert_load": [[3, 1], [2, 2]],
    }
    meta.update(meta_overrides)
    table = pa.Table.from_pylist(rows, schema=SCHEMA.with_metadata({"raymoe.window": json.dumps(meta)}))
    pq.write_table(table, path)
    return str(path)


def row(prompt_length=3, output_length=2, mean_logprob=-1.0, buckets=(1, 1, 1, 0), embedding=None):
    return {
        "prompt_length": prompt_length,
        "output_length": output_length,
        "mean_logprob": mean_logprob,
        "prompt_token_buckets": list(buckets),
        "embedding": embedding,
        "adapter": None,
        "finished_at": 12.0,
    }


def test_features_of_a_hand_written_window(tmp_path):
    # Prepare: three rows, one without a logprob, one without an embedding
    path = write_window(
        tmp_path / "window-0000000070000-a.parquet",
        [
            row(5, 3, -1.5, (1, 2, 1, 1), [0.5, 1.0]),
            row(3, 1, None, (1, 0, 1, 1), [2.0, -1.0]),
            row(2, 4, -0.25, (0, 0, 2, 0), None),
        ],
    )
    # Execute
    window = read_window(path)
    # Assert
    f = window.features
    assert set(f) <= set(FEATURES)
    assert f["prompt_length"].tolist() == [5, 3, 2]
    assert f["output_length"].tolist() == [3, 1, 4]
    assert f["mean_logprob"].tolist() == [-1.5, -0.25]  # the null dropped
    assert f["token_histogram"].tolist() == [2, 2, 4, 2]  # column sums worked by hand
    assert f["expert_load"].tolist() == [[3, 1], [2, 2]] and f["expert_load"].ndim == 2
    assert f["embedding"].tolist() == [[0.5, 1.0], [2.0, -1.0]]
    assert window.meta["num_requests_seen"] == 6 and window.meta["model"] == "tiny"
    assert window.sources == [path]


def test_a_window_without_embeddings_has_no_embedding_feature(tmp_path):
    window = read_window(write_window(tmp_path / "w.parquet", [row(), row()]))
    assert "embedding" not in window.features


def test_the_serving_app_writes_what_the_reader_reads(tmp_path):
    from raymoe.serve.request import TokenEvent
    from raymoe.serve.traffic_sampler import TrafficConfig, TrafficSampler

    sampler = TrafficSampler(
        TrafficConfig(enabled=True, output_dir=str(tmp_path), token_buckets=4),
        model_id="tiny",
        vocab_size=10,
        expert_counts=lambda: [[0, 0, 0]],
        background=False,
    )
    for prompt, logprobs in (([0, 3, 9], [-1.0, -3.0]), ([5, 5], [-0.5])):
        request = sampler.start(prompt)
        for i, lp in enumerate(logprobs):
            request.add("", TokenEvent(token_id=1, chosen_logprob=lp, embedding=[1.0, 2.0, 3.0] if i == 0 else None))
        sampler.record(request)
    [path] = sampler.flush()
    window = read_window(path)
    assert window.features["prompt_length"].tolist() == [3, 2]
    assert window.features["output_length"].tolist() == [2, 1]
    assert window.features["mean_logprob"].tolist() == [-2.0, -0.5]
    # 0 -> 0, 3 -> 1, 9 -> 3, 5 -> 2 (t * 4 // 10)
    assert window.features["token_histogram"].tolist() == [1, 1, 2, 1]
    assert window.features["embedding"].shape == (2, 3)
    assert window.features["expert_load"].tolist() == [[0, 0, 0]]
    assert list_windows(tmp_path) == [path]


def test_list_windows_orders_by_end_time_and_skips_other_files(tmp_path):
    for name in (
        "window-0000000002000-b.parquet",
        "window-0000000001000-z.parquet",
        "window-0000000002000-a.parquet",
        ".window-0000000003000-a.parquet.abc.tmp",
        "notes.txt",
        "window-12-a.parquet",
    ):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in list_windows(tmp_path)] == [
        "window-0000000001000-z.parquet",
        "window-0000000002000-a.parquet",
        "window-0000000002000-b.parquet",
    ]


def test_merge_concatenates_rows_and_sums_counts(tmp_path):
    a = read_window(write_window(tmp_path / "a.parquet", [row(5, embedding=[1.0, 0.0])], start=0.0, end=60.0))
    b = read_window(
        write_window(
            tmp_path / "b.parquet",
            [row(7, mean_logprob=-2.0), row(9, buckets=(0, 0, 0, 4))],
            start=60.0,
            end=120.0,
            expert_load=[[1, 1], [0, 2]],
            sample_rate=1.0,
        )
    )
    merged = merge_windows([a, b])
    assert merged.features["prompt_length"].tolist() == [5, 7, 9]
    assert merged.features["mean_logprob"].tolist() == [-1.0, -2.0, -1.0]
    assert merged.features["token_histogram"].tolist() == [2, 2, 2, 4]  # (1,1,1,0) twice + (0,0,0,4)
    assert merged.features["expert_load"].tolist() == [[4, 2], [2, 4]]
    assert merged.features["embedding"].tolist() == [[1.0, 0.0]]
    m = merged.meta
    assert (m["start"], m["end"], m["num_sampled"], m["num_requests_seen"]) == (0.0, 120.0, 3, 6)
    assert m["sample_rate"] is None  # 0.5 and 1.0: no single rate
    assert merged.sources == [a.sources[0], b.sources[0]]


@pytest.mark.parametrize(
    "overrides, rows_b, what",
    [
        ({"token_buckets": 3}, [row(buckets=(1, 1, 1))], "token_buckets"),
        ({"vocab_size": 20}, [row()], "vocab_size"),
        ({"expert_load": [[1, 1, 1], [1, 1, 1]]}, [row()], "expert_load"),
    ],
)
def test_merge_refuses_windows_of_another_shape_naming_both_files(tmp_path, overrides, rows_b, what):
    a = read_window(write_window(tmp_path / "first.parquet", [row()]))
    b = read_window(write_window(tmp_path / "second.parquet", rows_b, **overrides))
    with pytest.raises(ValueError, match=what) as info:
        merge_windows([a, b])
    assert "first.parquet" in str(info.value) and "second.parquet" in str(info.value)


def test_merge_refuses_embeddings_of_another_width(tmp_path):
    a = read_window(write_window(tmp_path / "first.parquet", [row(embedding=[1.0, 2.0])]))
    b = read_window(write_window(tmp_path / "second.parquet", [row(embedding=[1.0, 2.0, 3.0])]))
    with pytest.raises(ValueError, match=r"first\.parquet.*2-dim.*second\.parquet.*3-dim"):
        merge_windows([a, b])


def corrupt(path):
    path.write_bytes(b"PAR1 this is not parquet")


def no_metadata(path):
    pq.write_table(pa.table({"prompt_length": pa.array([1], pa.int32())}), path)


def wrong_format(path):
    write_window(path, [row()], format=2)


def rows_disagree(path):
    write_window(path, [row()], num_sampled=2)


def short_bucket_row(path):
    write_window(path, [row(buckets=(1, 2))])


def ragged_expert_load(path):
    write_window(path, [row()], expert_load=[[1, 2], [3]])


def missing_column(path):
    meta = {
        "format": 1,
        "start": 0,
        "end": 1,
        "model": "m",
        "vocab_size": 10,
        "token_buckets": 4,
        "sample_rate": 1.0,
        "num_requests_seen": 1,
        "num_sampled": 1,
        "expert_load": [[1]],
    }
    table = pa.table({"prompt_length": pa.array([1], pa.int32())})
    pq.write_table(table.replace_schema_metadata({"raymoe.window": json.dumps(meta)}), path)


def text_lengths(path):
    schema = SCHEMA.set(0, pa.field("prompt_length", pa.string()))
    table = pa.Table.from_pylist([{**row(), "prompt_length": "3"}], schema=schema)
    meta = {
        "format": 1,
        "start": 0,
        "end": 1,
        "model": "m",
        "vocab_size": 10,
        "token_buckets": 4,
        "sample_rate": 1.0,
        "num_requests_seen": 1,
        "num_sampled": 1,
        "expert_load": [[1]],
    }
    pq.write_table(table.replace_schema_metadata({"raymoe.window": json.dumps(meta)}), path)


@pytest.mark.parametrize(
    "make, reason",
    [
        (corrupt, "not a readable Parquet file"),
        (no_metadata, "not a raymoe traffic window"),
        (wrong_format, "format 2"),
        (rows_disagree, "num_sampled"),
        (short_bucket_row, "must all hold 4 values"),
        (ragged_expert_load, "expert_load"),
        (missing_column, "column 'output_length' is missing"),
        (text_lengths, "column 'prompt_length' is string"),
    ],
)
def test_a_bad_file_raises_value_error_naming_the_path(tmp_path, make, reason):
    path = tmp_path / "window-0000000001000-bad.parquet"
    make(path)
    with pytest.raises(ValueError, match=reason) as info:
        read_window(path)
    assert str(path) in str(info.value)


def test_a_missing_file_raises_value_error(tmp_path):
    with pytest.raises(ValueError, match=r"gone\.parquet"):
        read_window(tmp_path / "gone.parquet")


def test_the_reader_imports_neither_torch_nor_ray_nor_serve():
    import subprocess
    import sys

    code = (
        "import sys, raymoe.monitor.traffic_windows; "
        "print(sorted(m for m in ('torch', 'ray', 'raymoe.serve', 'raymoe.models') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
