"""The model on a GPU agrees with the CPU (fp32) and stays close under bf16 autocast.

Skipped without CUDA (CI has none); run on a GPU machine with `pytest tests/gpu`.
"""

import pytest
import torch

from raymoe.models import KVCache, MoETransformer, flavour
from raymoe.models.generate import generate

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_forward_on_cuda_matches_cpu_fp32():
    torch.manual_seed(0)
    cpu = MoETransformer(flavour("debug")).eval()
    gpu = MoETransformer(flavour("debug")).eval().cuda()
    gpu.load_state_dict(cpu.state_dict())
    ids = torch.randint(0, 2048, (2, 64))
    with torch.no_grad():
        expected = cpu(ids)
        got = gpu(ids.cuda()).cpu()
    assert (got - expected).abs().max() <= 1e-3


def test_bf16_autocast_close_to_fp32_and_decode_runs():
    torch.manual_seed(0)
    model = MoETransformer(flavour("debug")).eval().cuda()
    ids = torch.randint(0, 2048, (2, 64), device="cuda")
    with torch.no_grad():
        fp32 = model(ids)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            bf16 = model(ids)
    assert torch.nn.functional.cosine_similarity(fp32.flatten(), bf16.float().flatten(), dim=0) > 0.99
    cache = KVCache(model.cfg, num_slots=2, max_seq_len=96, device="cuda")
    assert cache.layers[0][0].is_cuda
    assert generate(model, ids[:, :8], max_new_tokens=16).shape == (2, 16)


def test_one_pass_step_on_cuda_matches_cpu_and_packing_is_skipped():
    from raymoe.inference.forward_jobs import ForwardJob, run_forward_jobs
    from raymoe.inference.packed import wants_packed_weights

    torch.manual_seed(0)
    cpu = MoETransformer(flavour("debug")).eval()
    gpu = MoETransformer(flavour("debug")).eval().cuda()
    gpu.load_state_dict(cpu.state_dict())
    assert not wants_packed_weights("onednn", gpu)  # oneDNN packing is a CPU path
    jobs = [
        ForwardJob(
            torch.randint(0, 2048, (2, 5)), torch.arange(5).expand(2, 5), torch.tensor([0, 1]), torch.tensor([4, 2])
        )
    ]
    expected = run_forward_jobs(cpu, jobs, KVCache(cpu.cfg, 2, 16))[0]
    got = run_forward_jobs(
        gpu, [j.to(torch.device("cuda")) for j in jobs], KVCache(gpu.cfg, 2, 16, device=torch.device("cuda"))
    )[0]
    assert (got.cpu() - expected).abs().max() <= 1e-3
