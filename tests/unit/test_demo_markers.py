"""The demo's stage markers: when a rerun may reuse a stage, and what reruns when one does not."""

import json

from raymoe.demo import markers
from raymoe.demo.runner import DEPS, ORDER


def test_hash_covers_the_config_and_the_upstream_hashes_but_not_key_order():
    # Prepare
    config = {"steps": 300, "layout": {"ep": 2, "dp": 1}}
    same_reordered = {"layout": {"dp": 1, "ep": 2}, "steps": 300}
    # Execute / Assert
    base = markers.config_hash(config, ["sha256:a"])
    assert base == markers.config_hash(same_reordered, ["sha256:a"])
    assert base != markers.config_hash({**config, "steps": 50}, ["sha256:a"])
    assert base != markers.config_hash(config, ["sha256:b"])
    assert base != markers.config_hash(config, [])


def test_a_marker_is_reused_only_with_its_hash_and_all_its_outputs(tmp_path):
    # Prepare: a finished stage with two outputs.
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    outputs = {"config": str(tmp_path / "model" / "config.json"), "model": str(tmp_path / "model")}
    markers.write_marker(
        tmp_path, "export", "sha256:x", outputs=outputs, summary="step 30", seconds=1.5, result={"step": 30}
    )
    # Execute
    marker = markers.read_marker(tmp_path, "export")
    # Assert: round trip, then the three ways it stops being reusable.
    assert marker["outputs"] == outputs and marker["result"] == {"step": 30} and marker["summary"] == "step 30"
    assert markers.reusable(marker, "sha256:x")
    assert not markers.reusable(marker, "sha256:y")
    assert not markers.reusable(None, "sha256:x")
    (tmp_path / "model" / "config.json").unlink()
    assert not markers.reusable(marker, "sha256:x")


def test_a_damaged_or_foreign_marker_reads_as_none(tmp_path):
    # Prepare
    path = markers.marker_path(tmp_path, "train")
    path.parent.mkdir(parents=True)
    # Execute / Assert
    path.write_text('{"stage": "train", "config_hash": "sha256:x", "outp')  # torn
    assert markers.read_marker(tmp_path, "train") is None
    path.write_text(json.dumps(["not", "a", "marker"]))
    assert markers.read_marker(tmp_path, "train") is None
    assert markers.read_marker(tmp_path, "ingest") is None  # none written


def test_a_stage_that_runs_makes_every_stage_downstream_run():
    # Prepare: a -> b -> c, and d on its own.
    order, deps = ["a", "b", "c", "d"], {"a": (), "b": ("a",), "c": ("b",), "d": ()}
    # Execute / Assert
    assert markers.stages_to_run(order, deps, {"a": True, "b": True, "c": True, "d": True}) == set()
    assert markers.stages_to_run(order, deps, {"a": True, "b": False, "c": True, "d": True}) == {"b", "c"}
    assert markers.stages_to_run(order, deps, {"a": False, "b": True, "c": True, "d": True}) == {"a", "b", "c"}
    assert markers.stages_to_run(order, deps, {"a": True, "b": True, "c": True}) == {"d"}  # no marker


def test_the_demo_order_puts_every_stage_after_what_it_reads():
    # A changed fine-tuning config reruns fine-tuning only; a changed load reruns drift, re-placement
    # and the report too (they read its windows).
    for i, stage in enumerate(ORDER):
        assert all(ORDER.index(dep) < i for dep in DEPS[stage]), stage
    reuse = dict.fromkeys(ORDER, True)
    assert markers.stages_to_run(ORDER, DEPS, {**reuse, "finetune": False}) == {"finetune"}
    assert markers.stages_to_run(ORDER, DEPS, {**reuse, "load": False}) == {"load", "drift", "rebalance", "report"}
    assert markers.stages_to_run(ORDER, DEPS, {**reuse, "ingest": False}) == set(ORDER) - {"dashboards"}
