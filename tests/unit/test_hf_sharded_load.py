"""`load_hf(path, expert_ids=...)` allocates and reads only the experts asked for (expert-parallel
workers: fine-tuning ranks, serving shards), and matches the full model on what it holds."""

import torch

from raymoe.models import MoE, MoETransformer, flavour, load_hf, save_hf
from raymoe.parallel.layout import ParallelLayout, shard_model_experts


def test_sharded_load_reads_only_held_experts(tmp_path, monkeypatch) -> None:
    # Prepare: a debug artifact; every tensor read from its files is recorded.
    full = MoETransformer(flavour("debug"))
    full.init_weights(seed=7)
    save_hf(full, tmp_path)
    import raymoe.models.hf_io as hf_io

    read: list[str] = []
    real_read = hf_io.read_weight

    def recording_read(reader, key):
        read.append(key)
        return real_read(reader, key)

    monkeypatch.setattr(hf_io, "read_weight", recording_read)
    # Execute: the share of ep rank 1 of 4 (experts 2 and 3).
    part = load_hf(tmp_path, expert_ids=[2, 3])
    # Assert: expert tensors read are exactly experts 2 and 3 of each MoE layer (3 matrices each).
    experts_read = sorted({int(k.split(".experts.")[1].split(".")[0]) for k in read if ".experts." in k})
    assert experts_read == [2, 3]
    assert sum(".experts." in k for k in read) == 3 * 2 * 3  # 3 MoE layers x 2 experts x 3
    want = full.state_dict()
    for name, tensor in part.state_dict().items():
        if ".experts.w_" in name:
            torch.testing.assert_close(tensor, want[name][2:4], rtol=0, atol=0)
        else:
            torch.testing.assert_close(tensor, want[name], rtol=0, atol=0)
    # Sharding a model that already holds its rank's experts keeps the same tensors.
    moe = part.layers[1].ffn
    assert isinstance(moe, MoE)
    before = moe.experts.w_gate_EFD
    shard_model_experts(part, ParallelLayout(ep=4), rank=1, ep_group=object())
    assert moe.experts.w_gate_EFD is before
