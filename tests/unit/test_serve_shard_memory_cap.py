"""A model larger than one serving worker's memory is served at ep=4 and refused cleanly at ep=1.

Each shard worker process caps its own address space (`resource.setrlimit(RLIMIT_AS)`) at
320 MiB above what it had mapped once its code was imported. The `small` flavour's parameters
take 425 MiB in fp32 (dense 89 MiB + experts 336 MiB), more than the cap; an ep=4 worker holds
the dense weights and a quarter of the experts, 173 MiB.
- ep=1: `ShardWorker` refuses before allocating or reading any tensor, with an error naming the
  layout, the estimate and the limit (not an allocation failing half-way, not a kernel kill);
- ep=4: the four capped workers load their shares (dense + 1/4 of the experts, counted by hand),
  join one gloo group and serve a prefill and a decode step whose greedy token and top-5
  log-probabilities (sampled on the worker) equal the whole model's (the one the artifact was
  saved from, run uncapped in the test process).
The same numbers with `memory_per_worker_gb` refuse ep=1 in the worker's constructor too.
"""

import ctypes
import ctypes.util
import os
import pickle
import resource
import tempfile

import pytest
import torch
import torch.multiprocessing as mp

from raymoe.inference.forward_jobs import ForwardJob, run_forward_jobs
from raymoe.models import KVCache, MoETransformer, flavour, save_hf
from raymoe.parallel.layout import ExpertPlacement
from raymoe.parallel.shard_memory import WorkerMemoryError
from raymoe.serve.request import SamplingParams
from raymoe.serve.sampling import RowSampling
from raymoe.serve.shard_worker import ShardWorker

MIB = 1024**2
CAP_MIB = 320
# `small`: 8 layers, the first dense, so 7 MoE layers of 16 experts, each expert 3 matrices of
# dim 512 x hidden 512, fp32.
EXPERT_BYTES = 7 * 16 * 3 * 512 * 512 * 4  # 336 MiB
PROMPT_LEN = 8
GREEDY_TOP5 = SamplingParams(temperature=0.0, logprobs=5)
_M_ARENA_MAX = -8  # glibc mallopt parameter


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith(field + ":"))


def _jobs() -> tuple[ForwardJob, ForwardJob]:
    """A prefill of four rows (engine slots 0-3) and the decode step after it."""
    g = torch.Generator().manual_seed(3)
    prefill = ForwardJob(
        torch.randint(3, 8192, (4, PROMPT_LEN), generator=g),
        torch.arange(PROMPT_LEN).expand(4, PROMPT_LEN),
        torch.arange(4),
        torch.full((4,), PROMPT_LEN - 1),
    )
    decode = ForwardJob(
        torch.randint(3, 8192, (4, 1), generator=g),
        torch.full((4, 1), PROMPT_LEN),
        torch.arange(4),
        torch.zeros(4, dtype=torch.long),
    )
    return prefill, decode


def _capped_shard(rank, world, init_file, out_dir, model_path, cap_bytes):
    """One shard worker under an address-space cap: load, join the group, serve two steps."""
    # Imported before the cap is set, so that it measures the worker's tensors, not code: the
    # meta-device build imports torch._dynamo (~70 MiB of address space) on first use.
    import torch._dynamo

    import raymoe.models.hf_io as hf_io

    # glibc gives each new thread an arena that reserves 64 MiB of address space up front (gloo's
    # threads add two): one arena, so the cap measures memory rather than reservations.
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.mallopt(_M_ARENA_MAX, 1)
    reads = []
    real_read = hf_io.read_weight

    def counting_read(reader, key):
        reads.append(key)
        return real_read(reader, key)

    hf_io.read_weight = counting_read
    mapped = _status_bytes("VmSize")
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (mapped + cap_bytes, hard))
    placement = ExpertPlacement.contiguous(16, world)
    try:
        worker = ShardWorker(model_path, rank, world, placement.to_dict(), num_threads=1)
    except WorkerMemoryError as exc:
        result = {"error": str(exc), "reads": len(reads), "used": _status_bytes("VmPeak") - mapped}
    else:
        worker.join_group(f"file://{init_file}", timeout_s=120)
        worker.make_cache(1, 2 * PROMPT_LEN)
        # Engine slot s lives on worker s mod world as local row s // world (one row each here).
        row = torch.tensor([rank])
        steps = []
        for job in _jobs():
            local = job.rows(row)
            local.slot_ids_B = local.slot_ids_B // world
            # Greedy with the top 5 log-probabilities: the worker samples its own row.
            ((drawn,),), _ = worker.run([local], [[RowSampling(GREEDY_TOP5, None, False)]])
            steps.append((drawn.token, drawn.top_logprobs))
        held = {"dense": 0, "experts": 0}
        for name, p in worker.model.named_parameters():
            held["experts" if ".experts." in name else "dense"] += p.numel() * p.element_size()
        result = {
            "held": held,
            "expert_ids": [list(moe.experts.expert_ids) for moe in worker.model.moe_layers()],
            "draws": steps,
            "used": _status_bytes("VmPeak") - mapped,
        }
        worker.shutdown()
    with open(os.path.join(out_dir, f"result-{rank}.pkl"), "wb") as fh:
        pickle.dump(result, fh)


def _launch(world: int, model_path: str, cap_bytes: int) -> list[dict]:
    """Runs `_capped_shard` on `world` processes (forked from a fork server that imported torch)."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch.distributed", "torch._dynamo", __name__])
    with tempfile.TemporaryDirectory(prefix="raymoe-shard-cap-") as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        mp.start_processes(
            _capped_shard,
            args=(world, init_file, tmp, model_path, cap_bytes),
            nprocs=world,
            start_method="forkserver",
        )
        results = []
        for rank in range(world):
            with open(os.path.join(tmp, f"result-{rank}.pkl"), "rb") as fh:
                results.append(pickle.load(fh))
        return results


@pytest.fixture(scope="module")
def small_model() -> MoETransformer:
    """The whole `small` model with random weights (drawn in bulk: the per-tensor init is slower)."""
    with torch.device("meta"):
        model = MoETransformer(flavour("small"))
    model.materialize("cpu", init=False)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.fill_(1.0)  # norm weights
            else:
                p.normal_(0.0, 512**-0.5, generator=g)
    return model.eval()


@pytest.fixture(scope="module")
def artifact(small_model, tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("small-artifact")
    save_hf(small_model, path)
    return str(path)


@pytest.fixture(scope="module")
def dense_bytes() -> int:
    with torch.device("meta"):
        full = MoETransformer(flavour("small"))
    return 4 * sum(p.numel() for p in full.parameters()) - EXPERT_BYTES


def test_capped_shard_workers_serve_at_ep4_and_ep1_is_refused_before_loading(artifact, small_model, dense_bytes):
    # Prepare: the whole model does not fit the cap; dense + a quarter of the experts does.
    cap = CAP_MIB * MIB
    shape = flavour("small")
    assert (shape.num_layers, shape.first_k_dense, shape.moe.num_experts) == (8, 1, 16)
    want_ep4 = dense_bytes + EXPERT_BYTES // 4
    assert dense_bytes + EXPERT_BYTES > cap > want_ep4
    # Execute: ep=1 (one capped worker), then ep=4 (four capped workers in one gloo group).
    (ep1,) = _launch(1, artifact, cap)
    ep4 = _launch(4, artifact, cap)
    # Assert: ep=1 refused with the layout, the estimate and the limit named, having read no
    # tensor and mapped less than the dense weights alone.
    print(f"\nep=1 under a {CAP_MIB} MiB address-space cap ({ep1['used'] / MIB:.0f} MiB used): {ep1.get('error')}")
    assert "error" in ep1, ep1
    whole_gib = (dense_bytes + EXPERT_BYTES) / 1024**3
    for needle in ("layout ep=1", "16 of 16 experts", f"~{whole_gib:.2f} GiB", "RLIMIT_AS", "raise ep"):
        assert needle in ep1["error"]
    assert ep1["reads"] == 0
    assert ep1["used"] < dense_bytes
    # ep=4: every capped worker holds dense + its quarter of the experts and served both steps
    # with the whole model's logits.
    cache = KVCache(small_model.cfg, 4, 2 * PROMPT_LEN)
    want_logits = [run_forward_jobs(small_model, [job], cache)[0] for job in _jobs()]
    for rank, worker in enumerate(ep4):
        assert "error" not in worker, worker
        held = worker["held"]["dense"] + worker["held"]["experts"]
        print(
            f"ep=4 rank {rank}: holds {held / MIB:.0f} MiB (expected {want_ep4 / MIB:.0f}), "
            f"address space used {worker['used'] / MIB:.0f} of {CAP_MIB} MiB"
        )
        assert worker["expert_ids"] == [list(range(4 * rank, 4 * rank + 4))] * 7
        assert abs(held - want_ep4) <= 0.05 * want_ep4
        assert worker["used"] <= cap
        for step, (token, top) in enumerate(worker["draws"]):
            want_logprobs_V = want_logits[step][rank].log_softmax(-1)
            assert token == int(want_logprobs_V.argmax())
            values, ids = want_logprobs_V.topk(5)
            assert list(top) == ids.tolist()
            torch.testing.assert_close(torch.tensor(list(top.values())), values, rtol=1e-4, atol=1e-4)


def test_memory_budget_refuses_ep1_before_reading_any_tensor(artifact, monkeypatch):
    # Prepare: count the tensors read from the artifact.
    import raymoe.models.hf_io as hf_io

    reads = []
    real_read = hf_io.read_weight
    monkeypatch.setattr(hf_io, "read_weight", lambda reader, key: reads.append(key) or real_read(reader, key))
    placement = ExpertPlacement.contiguous(16, 1)
    # Execute / Assert: the configured budget is named and nothing was read.
    with pytest.raises(WorkerMemoryError, match=r"layout ep=1: .*16 of 16 experts.*memory_per_worker_gb=0\.3125"):
        ShardWorker(artifact, 0, 1, placement.to_dict(), memory_per_worker_gb=CAP_MIB / 1024)
    assert reads == []
