"""The serving benchmark's transformers peer: its batch is the server's prompts, left-padded so
that each row generates what that prompt generates alone."""

import torch

from bench.serve_load import left_padded, server_prompts


def test_server_prompts_are_the_requests_prompts_and_differ(tmp_path):
    from raymoe.data.chat_tokenizer import ChatTokenizer
    from raymoe.serve.debug_artifact import make_debug_artifact

    artifact = make_debug_artifact(tmp_path / "tiny", vocab_size=300, dim=64, num_layers=1, max_seq_len=64)
    tokenizer = ChatTokenizer.from_dir(str(artifact))
    prompts = server_prompts(tokenizer, 8)
    assert len({tuple(p) for p in prompts}) == 8
    assert prompts[3] == tokenizer.encode(
        "3 experts route tokens to workers and back again while the batch keeps decoding"
    )


def test_left_padded_batch_generates_each_prompt_as_alone(tmp_path):
    from transformers import AutoModelForCausalLM

    from raymoe.serve.debug_artifact import make_debug_artifact

    artifact = make_debug_artifact(tmp_path / "tiny", vocab_size=300, dim=64, num_layers=2, max_seq_len=64)
    model = AutoModelForCausalLM.from_pretrained(str(artifact)).eval()
    prompts = [[5, 17, 42, 9, 33, 250, 7], [8, 91], [100, 4, 61, 77]]  # lengths differ: rows are padded
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None, max_new_tokens=6, min_new_tokens=6)
    with torch.inference_mode():
        inputs = left_padded(prompts)
        assert inputs["attention_mask"].sum(1).tolist() == [7, 2, 4]
        batched = model.generate(**inputs, **kw)[:, inputs["input_ids"].shape[1] :]
        for row, prompt in zip(batched.tolist(), prompts):
            alone = model.generate(torch.tensor([prompt]), **kw)[0, len(prompt) :].tolist()
            assert row == alone
