"""The ingest job config: the shipped debug YAML loads, mistakes are named."""

from pathlib import Path

import pytest

from raymoe.config import ConfigError, from_dict, load_config, to_dict
from raymoe.data.ingest_config import IngestConfig, output_config

ROOT = Path(__file__).resolve().parents[2]
DEBUG = ROOT / "pipelines/configs/ingest.debug.yaml"


def test_debug_config_matches_the_debug_model():
    from raymoe.models.config import flavour

    cfg = load_config(IngestConfig, DEBUG)
    model = flavour("debug")
    assert cfg.tokenizer.vocab_size == model.vocab_size == 2048
    assert cfg.pack.seq_len <= model.max_seq_len
    assert [s.name for s in cfg.sources] == ["code", "prose"]
    # Each source is one checksummed bundle (data/corpus/README.md).
    assert all((ROOT / p).is_file() and (ROOT / f"{p}.sha256").is_file() for s in cfg.sources for p in s.paths)


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
    data = {"sources": [{"name": "a", "paths": ["x"]}, {"name": "a", "paths": ["y"]}], "pack": {"seq_len": 8}}
    with pytest.raises(ConfigError, match=r"sources\[\]\.name must be unique"):
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
    with pytest.raises(ValueError, match=r"more than tokenizer\.vocab_size=270"):
        ingest._tokenizer(small, [], [], tmp_path / "out2", tmp_path / "work")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("execution.num_cpus=0", "execution.num_cpus must be null (all cores) or >= 1, got 0"),
        ("execution.cpus_per_task=-1", "execution.cpus_per_task must be >= 0, got -1.0"),
        ("tokenizer.min_frequency=0", "tokenizer.min_frequency must be >= 1, got 0"),
        ("sources=[{name: web, paths: [x], weight: .inf}]", "sources[web].weight must be >= 0 and finite, got inf"),
    ],
)
def test_numeric_bounds_are_named(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(IngestConfig, DEBUG, [override])
    assert str(err.value) == message


def test_missing_inputs_are_named_before_anything_runs(tmp_path):
    from raymoe.data.ingest_config import check_before_launch

    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "image.png").write_bytes(b"\x89PNG")
    for paths, needle in [
        ([str(tmp_path / "nope")], "nope"),
        ([str(tmp_path / "docs")], "docs"),
        ([str(tmp_path / "*.jsonl")], "*.jsonl"),
    ]:
        cfg = load_config(
            IngestConfig, DEBUG, [f"sources=[{{name: web, paths: {paths}}}]", f"output_dir={tmp_path / 'out'}"]
        )
        with pytest.raises(ConfigError, match=r"sources\[web\].paths: .* matches no input file") as err:
            check_before_launch(cfg)
        assert needle in str(err.value)
    cfg = load_config(
        IngestConfig,
        DEBUG,
        [
            f"tokenizer.path={tmp_path / 'tok'}",
            f"output_dir={tmp_path / 'out'}",
            f"sources=[{{name: docs, paths: [{ROOT / 'data/corpus/README.md'}]}}]",
        ],
    )
    with pytest.raises(ConfigError, match=r"tokenizer.path=.*tok' holds no tokenizer.json"):
        check_before_launch(cfg)
    assert not (tmp_path / "out").exists()
