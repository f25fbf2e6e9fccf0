"""Sharded checkpoints: exact resume, checksums, incomplete saves, retention, reshard, export."""

import json
import logging
import shutil

import numpy as np
import pytest
import torch

from raymoe.cli import main as cli_main
from raymoe.config import from_dict
from raymoe.models import MoETransformer, load_hf
from raymoe.parallel.launch import spawn_gloo
from raymoe.train.checkpoint import load_checkpoint
from raymoe.train.checkpoint_format import latest_valid_checkpoint, list_checkpoints, verify_checkpoint
from raymoe.train.config import TrainConfig
from raymoe.train.worker import run_worker
from tests.unit.ingest_output import write_ingest_output


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    rows = np.random.default_rng(1).integers(3, 2048, size=(64, 33))
    return str(write_ingest_output(tmp_path_factory.mktemp("data"), rows))


def _cfg(uri, data_dir, *, steps, every=1, keep=0, ep=1, dp=1):
    return from_dict(
        TrainConfig,
        {
            "flavour": "debug",
            "steps": steps,
            "seed": 5,
            "layout": {"ep": ep, "dp": dp},
            "optim": {"lr": 3e-3, "warmup_steps": 1},
            "data": {"path": data_dir, "seq_len": 32, "global_batch_size": 4},
            "checkpoint": {"uri": str(uri), "every_steps": every, "keep": keep},
            # Resharded weights are compared to 1e-5, an fp32 bound (`auto` is bf16 on AMX CPUs).
            "precision": "fp32",
        },
    )


def _run(rank, cfg_dict):
    return run_worker(from_dict(TrainConfig, cfg_dict))


def _weights(cfg, step):
    model = MoETransformer(cfg.model_config())
    load_checkpoint(cfg.checkpoint.uri, step, model=model, optimizer=None, groups=None)
    return model.state_dict()


def test_resume_continues_exactly(tmp_path, data_dir):
    # Prepare: 4 steps straight, and 2 steps + a resumed run to 4 in another directory.
    straight = run_worker(_cfg(tmp_path / "a", data_dir, steps=4, every=2))
    run_worker(_cfg(tmp_path / "b", data_dir, steps=2, every=2))
    # Execute
    resumed = run_worker(_cfg(tmp_path / "b", data_dir, steps=4, every=2))
    # Assert: weights, AdamW moments, balance bias and data position all came back, so steps 3
    # and 4 are bit-identical to the uninterrupted run.
    assert resumed.start_step == 2 and resumed.final_step == 4
    assert resumed.losses == straight.losses[2:]
    a = _weights(_cfg(tmp_path / "a", data_dir, steps=4), 4)
    b = _weights(_cfg(tmp_path / "b", data_dir, steps=4), 4)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_bad_checksum_is_skipped_with_warning(tmp_path, data_dir, caplog):
    cfg = _cfg(tmp_path / "c", data_dir, steps=2, every=1)
    run_worker(cfg)
    shard = tmp_path / "c" / "step-00000002" / "experts-ep000-of-001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF  # one flipped bit pattern in a tensor payload
    shard.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        assert latest_valid_checkpoint(str(tmp_path / "c")) == 1
    assert "skipping checkpoint step 2" in caplog.text and "checksum" in caplog.text
    # A resumed run starts from step 1, not from the corrupt step 2 and not from scratch: the
    # tensor it read failed its own checksum.
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        resumed = run_worker(_cfg(tmp_path / "c", data_dir, steps=3, every=1))
    assert resumed.start_step == 1
    assert "skipping checkpoint step 2" in caplog.text and "checksum mismatch" in caplog.text
    # The redone step 2 replaced the corrupt one; nothing was left aside.
    verify_checkpoint(str(tmp_path / "c"), 2)
    assert latest_valid_checkpoint(str(tmp_path / "c")) == 3
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["step-00000001", "step-00000002", "step-00000003"]


def test_a_share_corrupt_on_one_worker_makes_every_worker_fall_back(tmp_path, data_dir):
    # Prepare: checkpoints at steps 1 and 2 at ep=2; a tensor of step 2 that only rank 1 reads
    # (its expert file) is corrupted.
    saved = _cfg(tmp_path / "f", data_dir, steps=2, every=1, ep=2)
    spawn_gloo(_run, 2, saved.to_dict())
    shard = tmp_path / "f" / "step-00000002" / "experts-ep001-of-002.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    # Execute: resume at the same layout.
    resumed = spawn_gloo(_run, 2, _cfg(tmp_path / "f", data_dir, steps=3, every=1, ep=2).to_dict())
    # Assert: rank 0 read its whole share of step 2 without error, yet both ranks agreed on step 1.
    assert [s.start_step for s in resumed] == [1, 1]
    assert all(s.final_step == 3 for s in resumed)


def test_incomplete_saves_are_ignored_and_keep_prunes(tmp_path, data_dir):
    cfg = _cfg(tmp_path / "d", data_dir, steps=4, every=1, keep=2)
    run_worker(cfg)
    # A crash mid-save leaves a temp dir, or (object stores) a step dir without a manifest.
    (tmp_path / "d" / ".tmp-step-00000005").mkdir()
    (tmp_path / "d" / "step-00000006").mkdir()
    assert list_checkpoints(str(tmp_path / "d")) == [3, 4]
    assert latest_valid_checkpoint(str(tmp_path / "d")) == 4


def test_reshard_ep2_checkpoint_resumes_at_ep1_and_ep4(tmp_path, data_dir):
    # Prepare: 2 steps at ep=2, checkpoint at step 2, copied for each new layout.
    saved = _cfg(tmp_path / "ep2", data_dir, steps=2, every=2, ep=2)
    spawn_gloo(_run, 2, saved.to_dict())
    shutil.copytree(tmp_path / "ep2", tmp_path / "ep1")
    shutil.copytree(tmp_path / "ep2", tmp_path / "ep4")
    # Execute: step 3 at ep=1 (one process) and at ep=4 (four processes, two experts each).
    ep1_cfg = _cfg(tmp_path / "ep1", data_dir, steps=3, every=3, ep=1)
    ep4_cfg = _cfg(tmp_path / "ep4", data_dir, steps=3, every=3, ep=4)
    ep1 = run_worker(ep1_cfg)
    ep4 = spawn_gloo(_run, 4, ep4_cfg.to_dict())
    # Assert: both resumed at step 2; the loss of step 3 (the fixed batch at data position 2,
    # computed with the resharded weights) agrees; the updated weights (resharded AdamW state)
    # agree per expert.
    assert ep1.start_step == 2 and all(s.start_step == 2 for s in ep4)
    assert abs(ep4[0].losses[0] - ep1.losses[0]) <= 1e-6 * ep1.losses[0]
    w1, w4 = _weights(ep1_cfg, 3), _weights(ep4_cfg, 3)
    for key in w1:
        rel = float((w1[key] - w4[key]).norm() / w1[key].norm().clamp_min(1e-30))
        assert rel <= 1e-5, (key, rel)


def test_export_round_trips_through_load_hf(tmp_path, data_dir):
    cfg = _cfg(tmp_path / "e", data_dir, steps=1, every=1)
    run_worker(cfg)
    # Through the console script's entry: `raymoe export CHECKPOINT OUT`.
    assert cli_main(["export", str(tmp_path / "e"), str(tmp_path / "out")]) == 0
    manifest = json.loads((tmp_path / "out" / "raymoe_manifest.json").read_text())
    assert manifest["checkpoint"]["step"] == 1
    assert set(manifest["files"]) >= {"model.safetensors", "config.json"}
    # A directory without checkpoints is a clear error, not a traceback.
    assert cli_main(["export", str(tmp_path / "nothing"), str(tmp_path / "out2")]) == 2
    exported = load_hf(tmp_path / "out")
    reference = MoETransformer(cfg.model_config())
    load_checkpoint(cfg.checkpoint.uri, 1, model=reference, optimizer=None, groups=None)
    ids = torch.randint(0, 2048, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(exported(ids), reference(ids))
