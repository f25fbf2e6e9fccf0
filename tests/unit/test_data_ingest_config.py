"""The ingest job config: the shipped debug YAML loads, mistakes are named."""

from pathlib import Path

import pytest

from raymoe.config import ConfigError, from_dict, load_config, to_dict
from raymoe.data.ingest import IngestConfig, output_config

ROOT = Path(__file__).resolve().parents[2]
DEBUG = ROOT / "pipelines/configs/ingest.debug.yaml"


def test_debug_config_matches_the_debug_model():
    from raymoe.models.config import flavour

    cfg = load_config(IngestConfig, DEBUG)
    model = flavour("debug")
    assert cfg.tokenizer.vocab_size == model.vocab_size == 2048
    assert cfg.pack.seq_len <= model.max_seq_len
    assert [s.name for s in cfg.sources] == ["code", "prose"]
    assert all((ROOT / p).is_dir() for s in cfg.sources for p in s.paths)


def test_round_trip_and_overrides():
    cfg = load_config(IngestConfig, DEBUG, ["pack.seq_len=64", "dedup.near=false"])
    assert cfg.pack.seq_len == 64 and cfg.dedup.near is False
    assert from_dict(IngestConfig, to_dict(cfg)) == cfg


def test_recorded_config_leaves_out_placement():
    cfg = load_config(IngestConfig, DEBUG, ["output_dir=/elsewhere", "execution.unit_bytes=7"])
    assert output_config(cfg) == output_config(load_config(IngestConfig, DEBUG))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("pack.seqlen=3", "unknown key pack.seqlen"),
        ("pack.val_fraction=1.0", "pack.val_fraction must be in \\[0, 1\\), got 1.0"),
        ("tokenizer.vocab_size=10", "tokenizer.vocab_size must be >= 259, got 10"),
        ("decode.errors=strict", "decode.errors"),
        ("execution.unit_bytes=0", "execution.unit_bytes must be >= 1"),
    ],
)
def test_bad_values_are_named(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(IngestConfig, DEBUG, [override])


def test_duplicate_source_names():
    data = {"sources": [{"name": "a", "paths": ["x"]}, {"name": "a", "paths": ["y"]}],
            "pack": {"seq_len": 8}}
    with pytest.raises(ConfigError, match="sources\\[\\].name must be unique"):
        from_dict(IngestConfig, data)


def test_given_tokenizer_is_reused_not_trained(tmp_path):
    from raymoe.data import ingest
    from raymoe.data.tokenizer import save_tokenizer, tokenizer_hash, train_tokenizer

    # Prepare: a tokenizer from elsewhere.
    given = save_tokenizer(train_tokenizer(["some text to learn from"] * 5, 280), tmp_path / "given")
    cfg = load_config(IngestConfig, DEBUG, [f"tokenizer.path={given}", "tokenizer.vocab_size=300"])
    # Execute
    tok_dir, trained = ingest._tokenizer(cfg, [], [], tmp_path / "out", tmp_path / "work")
    # Assert: copied into the output, unchanged.
    assert trained is False and tok_dir == tmp_path / "out/tokenizer"
    assert tokenizer_hash(tok_dir) == tokenizer_hash(given)
    small = load_config(IngestConfig, DEBUG, [f"tokenizer.path={given}", "tokenizer.vocab_size=270"])
    with pytest.raises(ValueError, match="more than tokenizer.vocab_size=270"):
        ingest._tokenizer(small, [], [], tmp_path / "out2", tmp_path / "work")
