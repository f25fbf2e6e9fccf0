"""Expert parallelism over NCCL: an ep=2 training step on two GPUs equals one process's step, and
the all-to-all dispatcher over a one-rank NCCL group equals the local dispatcher (one GPU).

The gloo versions on the CPU are tests/unit/test_train_equivalence.py and
tests/unit/test_parallel_all_to_all.py. Here the same code runs with NCCL on CUDA, where the
counts exchange moves to the GPU (`all_to_all._collective_device`), `build_groups` builds a CUDA
device mesh and every gradient and loss reduction is an NCCL collective.

Skipped without CUDA. RAYMOE_GPU_TEST_ON_CPU=1 runs both tests with gloo on the CPU, which
checks the test logic (the ep=2 case then repeats the unit test).
"""

import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from raymoe.config import from_dict
from raymoe.models import MoETransformer, flavour
from raymoe.parallel.launch import spawn_gloo
from raymoe.train.checkpoint import load_checkpoint
from raymoe.train.config import TrainConfig
from raymoe.train.worker import run_worker
from tests.gpu.target_device import DEVICE_TYPE, ON_CPU, requires_cuda
from tests.unit.ingest_output import write_ingest_output

pytestmark = requires_cuda

BACKEND = "gloo" if ON_CPU else "nccl"


def _on_backend(rank, init_file, fn, *args):
    """Runs `fn(rank, *args)` in a `spawn_gloo` process whose default group is BACKEND's.

    The library's launcher joins its processes with gloo (on a cluster Ray Train's TorchConfig
    picks NCCL). The default group itself must be NCCL here, because `build_groups` derives the
    device mesh from it, so each rank leaves the gloo group and joins a BACKEND one over a second
    rendezvous file. Rank r drives GPU r: NCCL refuses two ranks on one device.
    """
    world = dist.get_world_size()
    device_id = None
    if BACKEND == "nccl":
        os.environ["LOCAL_RANK"] = str(rank)  # run_worker's device: cuda:LOCAL_RANK
        torch.cuda.set_device(rank)
        device_id = torch.device("cuda", rank)
    dist.destroy_process_group()
    dist.init_process_group(
        BACKEND, init_method=f"file://{init_file}", rank=rank, world_size=world, device_id=device_id
    )
    return fn(rank, *args)


def _launch(fn, world: int, tmp_path, *args):
    # env= makes spawn_gloo start fresh interpreters rather than fork from its server, which
    # imports this module and so has already asked CUDA for its devices: a process forked after
    # that cannot use CUDA. NCCL_DEBUG=WARN makes a failing NCCL call say why.
    return spawn_gloo(_on_backend, world, str(tmp_path / "rendezvous"), fn, *args, env={"NCCL_DEBUG": "WARN"})


# --- ep=2 against one process -------------------------------------------------------------------


def _train_config(data, tmp_path, name: str, ep: int) -> TrainConfig:
    return from_dict(
        TrainConfig,
        {
            "flavour": "debug",
            "steps": 1,
            "seed": 3,
            "layout": {"ep": ep, "dp": 1},
            "use_gpu": not ON_CPU,
            # fp32: the comparison is about the exchange, not about bf16 rounding.
            "precision": "fp32",
            # As in the unit test: lr 1e-3 keeps Adam from amplifying summation-order noise, and a max
            # norm below the actual norm makes the global norm across shards matter.
            "optim": {"lr": 1e-3, "warmup_steps": 0, "clip_norm": 0.5},
            "data": {"path": str(data), "seq_len": 32, "global_batch_size": 8},
            "checkpoint": {"uri": str(tmp_path / name), "every_steps": 1},
        },
    )


def _train_worker(rank, cfg_dict):
    summary = run_worker(from_dict(TrainConfig, cfg_dict))
    # GPU memory this rank allocated: non-zero only if the step really ran on its GPU.
    cuda_bytes = torch.cuda.max_memory_allocated(rank) if BACKEND == "nccl" else 0
    return {"summary": summary, "backend": dist.get_backend(), "cuda_bytes": cuda_bytes}


def _trained_state(cfg: TrainConfig) -> dict[str, torch.Tensor]:
    """The whole model after the step, read on the CPU from the (sharded) checkpoint."""
    model = MoETransformer(cfg.model_config())
    load_checkpoint(cfg.checkpoint.uri, 1, model=model, optimizer=None, groups=None)
    return model.state_dict()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


# Relative tolerances. The layouts sum the same fp32 terms in other orders (per-rank halves of
# the batch, then an all-reduce), so they agree to rounding, not bit for bit: on the CPU the
# worst updated tensor differs by ~2e-6 (the unit test allows 1e-5). On CUDA cuBLAS picks its
# kernels by shape (each rank multiplies half the rows) and index_add in backward sums in no fixed
# order, so the weights get 10x the CPU bound. A real fault is orders of magnitude larger: a
# dropped or misrouted row changes a weight's update by O(1), a mis-scaled reduction the norm by 2x.
LOSS_TOL = 1e-5
WEIGHT_TOL = 1e-4


def test_ep2_step_over_the_backend_matches_one_process(tmp_path):
    if not ON_CPU and torch.cuda.device_count() < 2:
        pytest.skip(
            f"ep=2 over NCCL needs 2 GPUs (NCCL refuses two ranks on one GPU); found {torch.cuda.device_count()}"
        )
    # Prepare: 16 rows of 33 tokens; one global batch of 8 sequences, split 4 + 4 at ep=2.
    tokens = np.random.default_rng(0).integers(3, 2048, size=(16, 33), dtype=np.int64)
    data = write_ingest_output(tmp_path / "data", tokens)
    single_cfg = _train_config(data, tmp_path, "single", ep=1)
    ep2_cfg = _train_config(data, tmp_path, "ep2", ep=2)

    # Execute: the reference in this process (no process group), ep=2 on two ranks.
    single = run_worker(single_cfg)
    ranks = _launch(_train_worker, 2, tmp_path, ep2_cfg.to_dict())

    # Assert: both ranks used the backend (and their GPUs); loss and global gradient norm (AdamW
    # is blind to a gradient's scale, the norm is not) agree; clipping was active.
    assert [r["backend"] for r in ranks] == [BACKEND, BACKEND]
    assert all(r["cuda_bytes"] > 0 for r in ranks) or ON_CPU
    assert single.grad_norms[0] > 0.5
    for r in ranks:
        got = r["summary"]
        assert abs(got.losses[0] - single.losses[0]) <= LOSS_TOL * abs(single.losses[0])
        assert abs(got.grad_norms[0] - single.grad_norms[0]) <= LOSS_TOL * single.grad_norms[0]
    ref, got = _trained_state(single_cfg), _trained_state(ep2_cfg)
    init = MoETransformer(single_cfg.model_config())
    init.init_weights(seed=single_cfg.seed)
    init_state = init.state_dict()
    for key, ref_tensor in ref.items():
        if key.endswith("bias_E"):
            # The balance bias moves by +-rate from integer global counts: equal exactly.
            torch.testing.assert_close(got[key], ref_tensor, rtol=0, atol=0)
            continue
        assert not torch.equal(ref_tensor, init_state[key]), f"{key} did not change"
        assert _rel(got[key], ref_tensor) <= WEIGHT_TOL, (key, _rel(got[key], ref_tensor))


# --- one rank: the all-to-all dispatcher against the local one ----------------------------------


def _one_rank_worker(rank):
    """Loss and gradients of one forward/backward of the debug model, first with its local
    dispatchers, then with an `AllToAllDispatcher` over the one-rank default group in each MoE
    layer. Returns them on the CPU with what the all-to-all dispatchers counted."""
    from raymoe.parallel.all_to_all import AllToAllDispatcher
    from raymoe.parallel.layout import ExpertPlacement

    device = torch.device("cuda", rank) if DEVICE_TYPE == "cuda" else torch.device("cpu")
    model = MoETransformer(flavour("debug"))
    model.init_weights(seed=0)
    model = model.to(device).train()
    ids_BT = torch.randint(0, model.cfg.vocab_size, (4, 33), generator=torch.Generator().manual_seed(1)).to(device)

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        logits_BTV = model(ids_BT[:, :-1])
        loss = F.cross_entropy(logits_BTV.reshape(-1, logits_BTV.shape[-1]).float(), ids_BT[:, 1:].reshape(-1))
        loss.backward()
        return float(loss), {n: p.grad.cpu() for n, p in model.named_parameters() if p.grad is not None}

    local = loss_and_grads()
    placement = ExpertPlacement.contiguous(model.cfg.moe.num_experts, 1)
    dispatchers = []
    for moe in model.moe_layers():
        moe.dispatcher = AllToAllDispatcher(dist.group.WORLD, placement=placement, ep_rank=0)
        dispatchers.append(moe.dispatcher)
    exchanged = loss_and_grads()
    stats = [d.stats for d in dispatchers]
    return {
        "local": local,
        "all_to_all": exchanged,
        "backend": dist.get_backend(),
        "calls": [s.calls for s in stats],
        "bytes_sent": [s.bytes_sent for s in stats],
    }


def test_all_to_all_over_a_one_rank_group_equals_the_local_dispatcher(tmp_path):
    # Execute: one rank (one GPU suffices); the reference is the same model's local dispatcher.
    (result,) = _launch(_one_rank_worker, 1, tmp_path)

    # Assert: the exchange really went through the backend (dispatch + combine per MoE layer),
    # sending nothing to peers since there are none.
    assert result["backend"] == BACKEND
    assert all(calls == 2 for calls in result["calls"]) and len(result["calls"]) > 0
    assert result["bytes_sent"] == [0] * len(result["calls"])
    # With one rank both dispatchers sort rows by expert id stably, so the experts see the same
    # rows in the same order: results agree to the last bits (the tolerance only allows for the
    # order index_add sums a token's K gradient pieces in).
    local_loss, local_grads = result["local"]
    loss, grads = result["all_to_all"]
    assert abs(loss - local_loss) <= 1e-6 * abs(local_loss)
    assert grads.keys() == local_grads.keys()
    assert any("experts" in name for name in grads)
    for name, expected in local_grads.items():
        torch.testing.assert_close(grads[name], expected, rtol=1e-5, atol=1e-7, msg=name)
