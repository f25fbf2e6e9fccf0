"""Sampling (temperature, top-k, top-p, seeds, logprobs) and stop-string detokenization."""

import math

import pytest
import torch

from raymoe.serve.detokenize import StopStringDetokenizer
from raymoe.serve.request import SamplingParams
from raymoe.serve.sampling import make_generator, sample, truncate_logits


def log_probs(*p):
    return torch.tensor([[math.log(x) for x in p]])


def test_greedy_rows_take_the_argmax_and_ignore_generators():
    logits = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 2.9]])
    out = sample(logits, [SamplingParams(temperature=0.0)] * 2, [None, None])
    assert out.tokens_B.tolist() == [1, 0]
    assert out.logprobs_B is None


def test_top_p_keeps_the_smallest_prefix_reaching_the_mass():
    # p = (.5, .3, .2): with top_p .7 the nucleus is {0, 1} (.5 < .7 <= .8)
    kept = truncate_logits(log_probs(0.5, 0.3, 0.2), torch.tensor([0]), torch.tensor([0.7]))
    assert torch.isfinite(kept).tolist() == [[True, True, False]]
    # top_p .5 is reached by token 0 alone
    kept = truncate_logits(log_probs(0.5, 0.3, 0.2), torch.tensor([0]), torch.tensor([0.5]))
    assert torch.isfinite(kept).tolist() == [[True, False, False]]


def test_top_k_keeps_k_best():
    kept = truncate_logits(log_probs(0.2, 0.5, 0.3), torch.tensor([2]), torch.tensor([1.0]))
    assert torch.isfinite(kept).tolist() == [[False, True, True]]


def test_sampling_frequencies_follow_the_renormalised_nucleus():
    # Prepare: nucleus {0, 1} -> P(0) = .5 / .8 = .625, P(2) = 0
    logits = log_probs(0.5, 0.3, 0.2).repeat(4000, 1)
    params = [SamplingParams(temperature=1.0, top_p=0.7)] * 4000
    gen = make_generator(1234)
    # Execute
    tokens = sample(logits, params, [gen] * 4000).tokens_B
    # Assert: 4 standard deviations (sd = sqrt(.625 * .375 / 4000) = .0077)
    assert (tokens == 2).sum() == 0
    assert abs((tokens == 0).float().mean().item() - 0.625) < 0.031


def test_temperature_sharpens_the_distribution():
    # p = (.6, .4) at T=1 -> at T=.5 p0 = .36 / (.36 + .16) = .692
    logits = log_probs(0.6, 0.4).repeat(4000, 1)
    tokens = sample(logits, [SamplingParams(temperature=0.5)] * 4000, [make_generator(7)] * 4000)
    assert abs((tokens.tokens_B == 0).float().mean().item() - 0.6923) < 0.03


def test_same_seed_same_tokens_regardless_of_batch_neighbours():
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    p = SamplingParams(temperature=1.0, seed=42)
    alone = [sample(logits[1:2], [p], [make_generator(42)]).tokens_B.item() for _ in range(1)]
    gens = [make_generator(1), make_generator(42), make_generator(3)]
    batched = sample(logits, [SamplingParams(temperature=1.0)] * 3, gens).tokens_B[1].item()
    assert batched == alone[0]


def test_logprobs_are_those_of_the_model_distribution():
    out = sample(log_probs(0.5, 0.3, 0.2), [SamplingParams(temperature=0.0, logprobs=2)], [None])
    assert out.tokens_B.tolist() == [0]
    assert out.logprobs_B[0].item() == pytest.approx(math.log(0.5), abs=1e-6)
    assert out.top_logprobs[0] == pytest.approx({0: math.log(0.5), 1: math.log(0.3)}, abs=1e-6)


class ByteTokenizer:
    """Each id is a fixed byte string; decode joins them like a byte-level BPE does."""

    def __init__(self, pieces):
        self.pieces = pieces

    def decode(self, ids, skip_special_tokens=True):
        return b"".join(self.pieces[i] for i in ids).decode("utf-8", errors="replace")


def stream(pieces, stop, ids):
    detok = StopStringDetokenizer(ByteTokenizer(pieces), stop)
    deltas = [detok.add(i) for i in ids]
    if not detok.stopped:
        deltas.append(detok.flush())
    return deltas, detok.stopped


def test_character_split_across_tokens_is_emitted_once_complete():
    deltas, _ = stream([b"caf", b"\xc3", b"\xa9", b"!"], [], [0, 1, 2, 3])
    assert deltas == ["caf", "", "\u00e9", "!", ""]


def test_stop_string_across_tokens_is_cut_and_never_shown_in_part():
    # "Hel" -> shown; "lo" -> "o" could start "o w", held; " wor" completes "o w" -> cut at 4
    deltas, stopped = stream([b"Hel", b"lo", b" wor", b"ld"], ["o w"], [0, 1, 2, 3])
    assert deltas == ["Hel", "l", "", ""]  # nothing after the stop either
    assert stopped
    assert "".join(deltas) == "Hell"


def test_held_text_is_released_when_it_turns_out_not_to_be_a_stop():
    deltas, stopped = stream([b"a", b"b", b"x"], ["abc"], [0, 1, 2])
    assert deltas == ["", "", "abx", ""]
    assert not stopped


def test_held_text_is_released_at_the_end():
    deltas, stopped = stream([b"a", b"b"], ["abc"], [0, 1])
    assert deltas == ["", "", "ab"] and not stopped


def test_earliest_of_several_stop_strings_wins():
    deltas, stopped = stream([b"one two three"], ["three", "two"], [0])
    assert deltas == ["one "] and stopped


def test_plain_temperature_frequencies_match_the_exact_softmax():
    # Prepare: 6 tokens, T = 0.7; the exact distribution is softmax(logits / 0.7).
    from scipy import stats

    logits = torch.tensor([[1.0, 0.5, 0.0, -0.5, -1.0, 2.0]])
    n = 6000
    tokens = sample(logits.repeat(n, 1), [SamplingParams(temperature=0.7)] * n, [make_generator(11)] * n).tokens_B
    expected = (logits[0].double() / 0.7).softmax(-1) * n
    observed = torch.bincount(tokens, minlength=6).double()
    # Assert: a chi-square goodness-of-fit test does not reject at 0.001 (fixed seed, so fixed)...
    assert stats.chisquare(observed.numpy(), expected.numpy()).pvalue > 1e-3
    # ...while it does reject the untempered softmax, so the test can tell the two apart.
    wrong = logits[0].double().softmax(-1).numpy() * n
    assert stats.chisquare(observed.numpy(), wrong).pvalue < 1e-6


def test_different_seeds_give_different_samples():
    logits = torch.zeros(1, 1000)  # uniform over 1000 tokens: 32 equal draws by chance is 1e-96

    def draw(seed):
        return [
            sample(logits, [SamplingParams(temperature=1.0)], [g]).tokens_B.item()
            for g in [make_generator(seed)]
            for _ in range(32)
        ]

    assert draw(1) == draw(1)
    assert draw(1) != draw(2)


@pytest.mark.parametrize("k", [0, 1, 3, 5])
def test_top_logprobs_count_is_honoured(k):
    logits = torch.randn(1, 40, generator=torch.Generator().manual_seed(k))
    out = sample(logits, [SamplingParams(temperature=0.0, logprobs=k)], [None])
    assert len(out.top_logprobs[0]) == k
    best = logits[0].log_softmax(-1).topk(k)
    assert list(out.top_logprobs[0]) == best.indices.tolist()
