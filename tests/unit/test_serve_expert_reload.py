"""Live re-placement's weight side: a worker's expert module for a new slot list keeps the experts
it holds, reads only the missing ones from the artifact, and computes what the whole model's
experts compute. No Ray: the functions run on a model sliced as a shard worker slices it."""

import pytest
import torch

from raymoe.inference.packed import pack_onednn
from raymoe.models import load_hf
from raymoe.models.hf_config import CheckpointError
from raymoe.parallel.layout import slice_grouped_experts
from raymoe.serve.debug_artifact import make_debug_artifact
from raymoe.serve.expert_reload import ExpertReader, experts_for_slots

SHAPE = {"dim": 32, "num_layers": 2, "max_seq_len": 64}


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    return make_debug_artifact(tmp_path_factory.mktemp("reload") / "moe8", seed=4, **SHAPE)


def worker_model(path, held):
    """The model as a shard worker holding `held` has it."""
    model = load_hf(path)
    for moe in model.moe_layers():
        slice_grouped_experts(moe.experts, held)
    return model


def reference_output(full_experts, keep, x_SD, counts):
    """What experts `keep` of the unsliced layer give for rows grouped by slot (the math by hand:
    SwiGLU per expert)."""
    out = []
    for slot, x_rows in enumerate(torch.split(x_SD, counts)):
        e = keep[slot]
        gate, up, down = full_experts.w_gate_EFD[e], full_experts.w_up_EFD[e], full_experts.w_down_EDF[e]
        out.append((torch.nn.functional.silu(x_rows @ gate.T) * (x_rows @ up.T)) @ down.T)
    return torch.cat(out)


def test_plain_experts_keep_held_and_read_only_missing(artifact):
    # Prepare: a worker holding experts 0..3; the new slots want 6, 1, 3, 7.
    full = load_hf(artifact)
    worker = worker_model(artifact, [0, 1, 2, 3])
    keep = [6, 1, 3, 7]
    layer_id, moe = 0, worker.layers[0].ffn
    before = moe.experts.w_gate_EFD.clone()
    # Execute
    with ExpertReader(artifact, worker.hf_architecture) as reader:
        new = experts_for_slots(moe.experts, keep, lambda missing: reader.read(layer_id, missing, moe.experts))
    # Assert: two experts read (6 and 7), each slot holds the whole model's weights of its expert,
    # and the running module is untouched.
    assert reader.num_read == 2
    assert new.expert_ids == keep
    full_experts = full.layers[0].ffn.experts
    for slot, expert in enumerate(keep):
        for name in ("w_gate_EFD", "w_up_EFD", "w_down_EDF"):
            assert torch.equal(getattr(new, name)[slot], getattr(full_experts, name)[expert])
    assert moe.experts.expert_ids == [0, 1, 2, 3] and torch.equal(moe.experts.w_gate_EFD, before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_packed_experts_reuse_packed_weights_and_compute_the_same(artifact, dtype):
    # Prepare: a packed worker (cpu_kernels onednn) holding 4..7; new slots 4, 0, 7, 2.
    full = load_hf(artifact).to(dtype)
    worker = pack_onednn(worker_model(artifact, [4, 5, 6, 7]).to(dtype))
    keep = [4, 0, 7, 2]
    layer_id, moe = 1, worker.layers[1].ffn
    current = moe.experts
    counts = [3, 1, 0, 2]
    x_SD = torch.randn(sum(counts), SHAPE["dim"], generator=torch.Generator().manual_seed(0)).to(dtype)
    # Execute
    with ExpertReader(artifact, worker.hf_architecture) as reader:
        new = experts_for_slots(current, keep, lambda missing: reader.read(layer_id, missing, current))
        y_SD = new(x_SD, counts)
    # Assert: kept experts share their packed weights (no copy), the fresh ones are packed in the
    # worker's dtype; the output is the whole model's.
    assert type(new) is type(current) and new.expert_ids == keep and reader.num_read == 2
    assert new._down[0] is current._down[0] and new._gate_up[2] is current._gate_up[3]
    assert new.weight_dtype == dtype and {w.dtype for w in new._gate_up + new._down} == {dtype}
    expected = reference_output(full.layers[1].ffn.experts, keep, x_SD, counts)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(y_SD, expected, rtol=tolerance, atol=tolerance)


def test_missing_tensor_is_named(artifact, tmp_path):
    worker = worker_model(artifact, [0, 1, 2, 3])
    moe = worker.layers[0].ffn
    with (
        ExpertReader(artifact, worker.hf_architecture) as reader,
        pytest.raises(CheckpointError, match=r"missing tensor 'model\.layers\.9\.block_sparse_moe"),
    ):
        reader.read(9, [5], moe.experts)
