"""`python -m pipelines.serve` end to end: debug artifact written, app deployed, one chat answered."""

import json

import pytest

from pipelines.serve import main
from tests.integration.local_processes import free_port


def test_serve_pipeline_deploys_and_answers(ray_cluster, tmp_path, capsys):
    port = free_port()
    rc = main(
        [
            "--config",
            "pipelines/configs/serve.debug.yaml",
            "block=false",
            f"http.port={port}",
            f"app.model_path={tmp_path / 'tiny-moe'}",
            f"debug_artifact={tmp_path / 'tiny-moe'}",
            "app.num_cpus=0.25",
            "app.api_key_env=",
            "app.engine.num_slots=2",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    assert f"serving 'tiny-moe' at http://127.0.0.1:{port}/v1" in out
    # The smoke reply is one JSON line; the request asked for at most 8 tokens.
    reply = json.loads(next(line for line in out.splitlines() if line.startswith('{"smoke_reply"')))
    usage = reply["usage"]
    assert reply["smoke_reply"]["role"] == "assistant"
    assert 1 <= usage["completion_tokens"] <= 8
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert (tmp_path / "tiny-moe" / "model.safetensors").is_file()


def test_serve_pipeline_rejects_bad_config_before_starting(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", "pipelines/configs/serve.debug.yaml", "app.engine.num_slotz=2"])
    assert exit_info.value.code == 2
    assert "app.engine.num_slotz" in capsys.readouterr().err
