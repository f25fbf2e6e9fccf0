"""One pass over a step's forward jobs (decodes + prompt chunks) against one pass per job."""

import pytest
import torch

from raymoe.inference.forward_jobs import ForwardJob, run_forward_jobs
from raymoe.models import KVCache, MoETransformer, flavour


def make_model(capacity_factor=None):
    cfg = flavour("debug")
    cfg.moe.capacity_factor = capacity_factor
    model = MoETransformer(cfg)
    model.init_weights(seed=2)
    return model.eval()


def step_jobs(vocab):
    """A step as the engine makes it: 3 decodes at different positions, 2 fresh prompts padded
    into one group, and the second chunk of a longer prompt (slot 5, from position 6)."""
    g = torch.Generator().manual_seed(0)
    decode = ForwardJob(
        torch.randint(0, vocab, (3, 1), generator=g),
        torch.tensor([[7], [4], [9]]),
        torch.tensor([0, 1, 2]),
        torch.zeros(3, dtype=torch.long),
    )
    fresh = ForwardJob(
        torch.randint(0, vocab, (2, 5), generator=g),
        torch.arange(5).expand(2, 5),
        torch.tensor([3, 4]),
        torch.tensor([4, 2]),
    )
    chunk = ForwardJob(
        torch.randint(0, vocab, (1, 4), generator=g), torch.arange(6, 10)[None], torch.tensor([5]), torch.tensor([3])
    )
    return [decode, fresh, chunk]


def filled_cache(model):
    """Slots 0-2 and 5 hold earlier tokens (the decodes' and the chunk's history)."""
    cache = KVCache(model.cfg, 6, 32)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for slot, length in ((0, 7), (1, 4), (2, 9), (5, 6)):
            ids = torch.randint(0, model.cfg.vocab_size, (1, length), generator=g)
            model(ids, torch.arange(length)[None], cache, torch.tensor([slot]))
    return cache


@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_one_pass_equals_a_pass_per_job_and_the_plain_forward(capacity_factor):
    model = make_model(capacity_factor)
    jobs = step_jobs(model.cfg.vocab_size)
    together_cache, apart_cache, plain_cache = (filled_cache(model) for _ in range(3))
    together = run_forward_jobs(model, jobs, together_cache)
    counts_together = model.tokens_per_expert().clone()
    apart, counts_apart = [], 0
    for job in jobs:
        apart += run_forward_jobs(model, [job], apart_cache)
        counts_apart = counts_apart + model.tokens_per_expert()
    for job, a, b in zip(jobs, together, apart):
        with torch.no_grad():
            full_BTV = model(job.ids_BT, job.positions_BT, plain_cache, job.slot_ids_B)
        plain = full_BTV[torch.arange(job.ids_BT.shape[0]), job.last_B]
        assert a.shape == (job.ids_BT.shape[0], model.cfg.vocab_size)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(a, plain, rtol=1e-4, atol=1e-4)
    # the step's routed tokens, counted once, padding left out (dropless: 3 decodes + the fresh
    # prompts' 5 + 3 real tokens + the chunk's 4 = 15 tokens, each to top-k experts)
    assert torch.equal(counts_together, counts_apart)
    if capacity_factor is None:
        assert int(counts_together[0].sum()) == 15 * model.cfg.moe.num_experts_per_tok
    for (first_a, second_a), (first_b, second_b) in zip(together_cache.layers, apart_cache.layers):
        torch.testing.assert_close(first_a, first_b, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(second_a, second_b, rtol=1e-4, atol=1e-4)


def test_no_jobs_still_runs_every_moe_layer_once():
    model = make_model()
    calls = []
    for moe in model.moe_layers():
        moe.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    assert run_forward_jobs(model, [], KVCache(model.cfg, 1, 8)) == []
    assert calls == [0] * len(list(model.moe_layers()))
