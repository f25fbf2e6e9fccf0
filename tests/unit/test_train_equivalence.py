"""One training step at ep=2, ep=1 x dp=2 and ep=2 x dp=2 equals one step of a single process.

No Ray: gloo processes spawned directly. The same global batch (8 sequences) goes through
(a) one process holding every expert; (b) ep=2: two processes with four experts each;
(c) dp=2: two processes each holding every expert and half the batch; (d) ep=2 x dp=2: four
processes, expert gradients reduced over their replicas; (e) ep=2 with the batch as 2 accumulated
micro-batches of 4 and activation checkpointing (the all-to-alls rerun in backward). The mean
loss over the global batch and every updated weight (compared per expert through the sharded
checkpoints each run writes) must agree to a relative 1e-5 in fp32: the layouts sum in other
orders, and fused AdamW's vectorised loop rounds an element differently depending on where it
falls in a tensor (observed: loss ~1e-7, gradient norm ~5e-9, the worst tensor ~2e-6). Clipping is
on with a max norm below the actual norm, so the global norm across shards matters. AdamW is blind
to a wrong gradient scale, so the global gradient norm is compared too: it is what catches a
mis-scaled expert or dense reduction.
"""

import numpy as np
import pytest
import torch

from raymoe.config import from_dict
from raymoe.models import MoETransformer
from raymoe.parallel.launch import spawn_gloo
from raymoe.train.checkpoint import load_checkpoint
from raymoe.train.config import TrainConfig
from raymoe.train.worker import run_worker
from tests.unit.ingest_output import write_ingest_output


def _config(data, tmp_path, name, ep, dp, accum=1, recompute=False):
    return from_dict(
        TrainConfig,
        {
            "flavour": "debug",
            "steps": 1,
            "seed": 3,
            "layout": {"ep": ep, "dp": dp},
            # lr 1e-3: Adam's first update is ~lr * sign(g), so for gradients near eps the fp32
            # summation-order noise of a different layout is amplified by lr / |weight|; at 1e-2 that
            # alone reaches ~3e-5 relative on a few weights.
            "optim": {"lr": 1e-3, "warmup_steps": 0, "clip_norm": 0.5, "grad_accum_steps": accum},
            # Micro-batch g holds rows perm[g*B:(g+1)*B]: two micro-batches of 4 are the same 8 rows.
            "data": {"path": str(data), "seq_len": 32, "global_batch_size": 8 // accum},
            "checkpoint": {"uri": str(tmp_path / name), "every_steps": 1},
            "activation_checkpointing": recompute,
            # The 1e-5 bound is fp32's; `auto` would autocast to bf16 on CPUs with AMX.
            "precision": "fp32",
        },
    )


def _worker(rank, cfg_dict):
    return run_worker(from_dict(TrainConfig, cfg_dict))


def _full_model(cfg):
    model = MoETransformer(cfg.model_config())
    load_checkpoint(cfg.checkpoint.uri, 1, model=model, optimizer=None, groups=None)
    return model.state_dict()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("equiv")
    tokens = np.random.default_rng(0).integers(3, 2048, size=(16, 33), dtype=np.int64)
    data = write_ingest_output(tmp_path / "data", tokens)
    single = _config(data, tmp_path, "single", 1, 1)
    torch.set_num_threads(1)
    out = {"single": (single, [run_worker(single)])}
    for name, cfg in (
        ("ep2", _config(data, tmp_path, "ep2", 2, 1)),
        ("dp2", _config(data, tmp_path, "dp2", 1, 2)),
        ("ep2dp2", _config(data, tmp_path, "ep2dp2", 2, 2)),
        ("ep2_accum_recompute", _config(data, tmp_path, "ep2_accum_recompute", 2, 1, accum=2, recompute=True)),
    ):
        out[name] = (cfg, spawn_gloo(_worker, cfg.world_size, cfg.to_dict()))
    return out


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@pytest.mark.parametrize("name", ["ep2", "dp2", "ep2dp2", "ep2_accum_recompute"])
def test_one_step_matches_single_process(runs, name):
    single_cfg, (single,) = runs["single"]
    cfg, summaries = runs[name]
    ref = _full_model(single_cfg)
    got = _full_model(cfg)
    init = MoETransformer(single_cfg.model_config())
    init.init_weights(seed=single_cfg.seed)

    # Clipping was active (norm above clip_norm=0.5), so the global norm across shards mattered.
    assert single.grad_norms[0] > 0.5
    for s in summaries:
        assert abs(s.grad_norms[0] - single.grad_norms[0]) <= 1e-5 * single.grad_norms[0]
    # Loss: every worker reports the same global mean, equal to the single process's.
    for s in summaries:
        assert abs(s.losses[0] - single.losses[0]) <= 1e-5 * abs(single.losses[0])
    # Weights: every tensor (each expert included) moved, and moved the same way.
    for key, ref_tensor in ref.items():
        if key.endswith("bias_E"):
            # The balance bias moves by +-rate from the global counts: equal exactly.
            torch.testing.assert_close(got[key], ref_tensor, rtol=0, atol=0)
            continue
        assert not torch.equal(ref_tensor, init.state_dict()[key]), f"{key} did not change"
        assert _rel(got[key], ref_tensor) <= 1e-5, (key, _rel(got[key], ref_tensor))
