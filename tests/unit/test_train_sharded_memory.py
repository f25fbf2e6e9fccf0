"""A worker of an `ep=N` layout allocates dense weights + 1/N of the experts, and reads only those.

- Memory: the `small` flavour at ep=4 (four gloo processes) after one optimizer step holds, per
  worker, parameters of exactly dense + 1/4 of the routed experts and AdamW state of twice that
  (within 5%); expected sizes are counted by hand from the flavour's shape. Peak RSS per worker is
  printed next to the ep=1 process's.
- Loading: a checkpoint saved at ep=2 is resumed at ep=4 with every file read recorded (byte
  ranges, below the checkpoint code); each range is mapped to tensors through the file's own
  header. No worker reads a byte of a tensor it does not hold, each expert file is opened only by
  the workers holding its experts, and together the workers read every tensor of the new layout.
"""

import json
import struct
from pathlib import Path
from typing import cast

import numpy as np
import torch
from torch.distributed import ProcessGroup

from raymoe.config import from_dict
from raymoe.models import MoETransformer, flavour
from raymoe.parallel.launch import spawn_gloo
from raymoe.parallel.layout import ExpertPlacement
from raymoe.train.config import TrainConfig
from raymoe.train.worker import run_worker
from tests.unit.ingest_output import write_ingest_output

MIB = 1024**2


def _one_step_memory(rank, cfg_dict):
    """Builds this rank's model, runs one optimizer step; returns its byte counts and peak RSS."""
    from raymoe.parallel.groups import build_groups
    from raymoe.parallel.shard_memory import peak_rss_bytes, shard_bytes
    from raymoe.train.memory import optimizer_bytes
    from raymoe.train.step import build_optimizer, train_step
    from raymoe.train.worker import build_sharded_model

    cfg = from_dict(TrainConfig, cfg_dict)
    groups = build_groups(cfg.layout)
    model = build_sharded_model(cfg, groups, torch.device("cpu"))
    optimizer = build_optimizer(model, cfg.optim)
    local = cfg.local_batch_size
    tokens = torch.randint(0, 8192, (local, cfg.data.seq_len + 1), generator=torch.Generator().manual_seed(rank))
    train_step(model, optimizer, [(tokens[:, :-1], tokens[:, 1:])], groups=groups, lr=1e-3, clip_norm=1.0)
    held = shard_bytes(model)
    return {
        "dense": held.dense,
        "experts": held.experts,
        "optimizer": optimizer_bytes(optimizer),
        "peak_rss": peak_rss_bytes(),
        "expert_ids": [list(moe.experts.expert_ids) for moe in model.moe_layers()],
    }


def _small_cfg(ep):
    return from_dict(
        TrainConfig,
        {
            "flavour": "small",
            "steps": 1,
            "layout": {"ep": ep, "dp": 1},
            "data": {"path": "unused", "seq_len": 16, "global_batch_size": 4},
            "checkpoint": {"uri": "unused"},
        },
    )


def test_ep4_worker_holds_dense_plus_a_quarter_of_the_experts():
    # Prepare: expected bytes by hand. `small`: 8 layers, the first dense, so 7 MoE layers of 16
    # experts, each expert 3 matrices of dim 512 x hidden 512, fp32.
    shape = flavour("small")
    assert (shape.num_layers, shape.first_k_dense, shape.moe.num_experts) == (8, 1, 16)
    expert_bytes = 7 * 16 * 3 * 512 * 512 * 4  # 352 MiB
    with torch.device("meta"):
        full = MoETransformer(shape)
    dense_bytes = 4 * sum(p.numel() for p in full.parameters()) - expert_bytes
    want_params = dense_bytes + expert_bytes // 4
    # Execute
    ep4 = spawn_gloo(_one_step_memory, 4, _small_cfg(4).to_dict())
    (ep1,) = spawn_gloo(_one_step_memory, 1, _small_cfg(1).to_dict())
    # Assert: parameters exactly dense + 1/4 of the experts; AdamW's two moments twice that.
    print(f"\nsmall flavour: dense {dense_bytes / MIB:.0f} MiB, experts {expert_bytes / MIB:.0f} MiB")
    for rank, w in enumerate(ep4):
        held = w["dense"] + w["experts"]
        print(
            f"ep=4 rank {rank}: params {held / MIB:.0f} MiB, AdamW {w['optimizer'] / MIB:.0f} MiB, "
            f"peak RSS {w['peak_rss'] / MIB:.0f} MiB"
        )
        assert w["expert_ids"] == [list(range(4 * rank, 4 * rank + 4))] * 7
        assert abs(held - want_params) <= 0.05 * want_params
        assert abs(w["optimizer"] - 2 * want_params) <= 0.05 * 2 * want_params
        assert abs(held + w["optimizer"] - 3 * want_params) <= 0.05 * 3 * want_params
    print(
        f"ep=1 process: params {(ep1['dense'] + ep1['experts']) / MIB:.0f} MiB, "
        f"AdamW {ep1['optimizer'] / MIB:.0f} MiB, peak RSS {ep1['peak_rss'] / MIB:.0f} MiB"
    )
    assert ep1["dense"] + ep1["experts"] == dense_bytes + expert_bytes
    # Each ep=4 worker leaves out 3/4 of the experts with their gradients and AdamW state
    # (~1 GiB); its peak RSS is well below the single process's.
    assert max(w["peak_rss"] for w in ep4) < ep1["peak_rss"] - 0.5 * expert_bytes


class _RecordingFile:
    """A pyarrow input file that records every byte range read from it."""

    def __init__(self, inner, log):
        self.inner, self.log, self.pos = inner, log, 0

    def read_at(self, nbytes, offset):
        self.log.append((offset, nbytes))
        return self.inner.read_at(nbytes, offset)

    def seek(self, pos):
        self.pos = pos
        return self.inner.seek(pos)

    def readinto(self, buf):
        n = self.inner.readinto(buf)
        self.log.append((self.pos, n))
        self.pos += n
        return n

    def read(self, nbytes=None):
        data = self.inner.read(nbytes) if nbytes is not None else self.inner.read()
        self.log.append((self.pos, len(data)))
        self.pos += len(data)
        return data

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.inner.close()

    def close(self):
        self.inner.close()


class _RecordingFS:
    def __init__(self, inner, reads):
        self.inner, self.reads = inner, reads

    def open_input_file(self, path):
        return _RecordingFile(self.inner.open_input_file(path), self.reads.setdefault(path, []))

    def open_input_stream(self, path):
        return _RecordingFile(self.inner.open_input_stream(path), self.reads.setdefault(path, []))

    def __getattr__(self, name):
        return getattr(self.inner, name)


def _resume_recording_reads(rank, cfg_dict) -> dict:
    import raymoe.train.checkpoint_format as checkpoint

    reads: dict[str, list] = {}
    real = checkpoint.open_uri

    def recording_open_uri(uri):
        fs, path = real(uri)
        return _RecordingFS(fs, reads), path

    checkpoint.open_uri = recording_open_uri
    summary = run_worker(from_dict(TrainConfig, cfg_dict))
    return {"start_step": summary.start_step, "reads": reads}


def _save(rank, cfg_dict):
    return run_worker(from_dict(TrainConfig, cfg_dict))


def _header(path: Path) -> tuple[int, dict]:
    """(data start, {tensor: (begin, end)}) of a safetensors file, parsed by hand."""
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    header.pop("__metadata__", None)
    return 8 + length, {k: tuple(v["data_offsets"]) for k, v in header.items()}


def _expert_of(key: str) -> int | None:
    parts = key.split(".")
    return int(parts[parts.index("experts") + 1]) if "experts" in parts else None


def test_resume_at_ep4_reads_only_held_tensors(tmp_path) -> None:
    # Prepare: 2 steps at ep=2 (checkpoint at step 2: experts 0-3 in one file, 4-7 in the other).
    rows = np.random.default_rng(2).integers(3, 2048, size=(16, 17))
    data = write_ingest_output(tmp_path / "data", rows)

    def cfg(ep):
        return from_dict(
            TrainConfig,
            {
                "flavour": "debug",
                "steps": 2,
                "seed": 4,
                "layout": {"ep": ep, "dp": 1},
                "data": {"path": str(data), "seq_len": 16, "global_batch_size": 4},
                "checkpoint": {"uri": str(tmp_path / "ckpt"), "every_steps": 2},
            },
        )

    spawn_gloo(_save, 2, cfg(2).to_dict())
    step_dir = tmp_path / "ckpt" / "step-00000002"
    # Execute: resume at ep=4 (nothing left to train: only the load runs).
    workers = spawn_gloo(_resume_recording_reads, 4, cfg(4).to_dict())
    # Assert
    placement = ExpertPlacement.contiguous(8, 4)
    tensor_files = sorted(p.name for p in step_dir.glob("*.safetensors") if not p.name.startswith("rng"))
    assert tensor_files == ["dense.safetensors", "experts-ep000-of-002.safetensors", "experts-ep001-of-002.safetensors"]
    read_by_anyone: set[tuple[str, str]] = set()
    for rank, worker in enumerate(workers):
        assert worker["start_step"] == 2
        held = set(placement.experts_of(rank))
        opened = {Path(p).name for p in worker["reads"]}
        # Each rank opens the manifest, the dense file and the one expert file holding its two
        # experts; never the other expert file, never another layout's RNG file.
        holder = "experts-ep000-of-002.safetensors" if rank < 2 else "experts-ep001-of-002.safetensors"
        assert opened == {"manifest.json", "dense.safetensors", holder}, (rank, opened)
        for name in ("dense.safetensors", holder):
            data_start, ranges = _header(step_dir / name)
            for offset, nbytes in worker["reads"][str(step_dir / name)]:
                if offset < data_start:
                    assert offset + nbytes <= data_start, "a read straddles header and data"
                    continue  # the header (length prefix + JSON)
                begin, end = offset - data_start, offset - data_start + nbytes
                keys = [k for k, (b, e) in ranges.items() if b < end and begin < e]
                assert len(keys) == 1 and ranges[keys[0]] == (begin, end), (
                    f"rank {rank} read bytes {begin}-{end} of {name}, not exactly one tensor: {keys}"
                )
                expert = _expert_of(keys[0])
                assert expert is None or expert in held, f"rank {rank} read {keys[0]}"
                read_by_anyone.add((name, keys[0]))
    # Together the ranks read every tensor: the whole dense file, every expert and its AdamW state.
    everything = {(name, key) for name in tensor_files for key in _header(step_dir / name)[1]}
    assert read_by_anyone == everything


def test_each_held_tensor_is_initialised_once_and_nothing_is_allocated_twice(monkeypatch) -> None:
    # Prepare: record every per-tensor initialisation and every torch.nn.init call on real memory.
    import raymoe.models.transformer as transformer
    from raymoe.parallel.groups import ParallelGroups
    from raymoe.parallel.layout import ParallelLayout
    from raymoe.train.worker import build_sharded_model

    drawn: list[str] = []
    real_seed = transformer._tensor_seed

    def recording_seed(seed, key):
        drawn.append(key)
        return real_seed(seed, key)

    monkeypatch.setattr(transformer, "_tensor_seed", recording_seed)
    touched_real = []

    def recording(real):
        def record(*args, **kwargs):
            tensor = args[0] if args else kwargs["tensor"]
            touched_real.append(not tensor.is_meta)
            return real(*args, **kwargs)

        return record

    for name in ("kaiming_uniform_", "uniform_", "normal_"):
        monkeypatch.setattr(torch.nn.init, name, recording(getattr(torch.nn.init, name)))
    cfg = _small_cfg(2)
    # A stand-in group: building the model runs no collective.
    groups = ParallelGroups(
        layout=ParallelLayout(ep=2, dp=1), rank=1, ep_group=cast(ProcessGroup, object()), dp_group=None
    )
    # Execute
    model = build_sharded_model(cfg, groups, torch.device("cpu"))
    # Assert: the constructors' own inits ran on the meta device only; each held tensor drew once;
    # rank 1 drew its experts 8-15 of every MoE layer and none of rank 0's.
    assert touched_real and not any(touched_real)
    assert len(drawn) == len(set(drawn))
    experts = {key for key in drawn if ".experts." in key}
    assert experts == {
        f"layers.{i}.ffn.experts.{p}.{e}"
        for i in range(1, 8)
        for e in range(8, 16)
        for p in ("w_gate_EFD", "w_up_EFD", "w_down_EDF")
    }
    matrices = [n for n, p in model.named_parameters() if p.ndim >= 2 and ".experts." not in n]
    assert sorted(k for k in drawn if ".experts." not in k) == sorted(matrices)
