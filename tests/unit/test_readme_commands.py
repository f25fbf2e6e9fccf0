"""Every command in the README's `<!-- runnable -->` blocks is one the code accepts.

Each command is checked without running the work it names (that would be minutes of training):
a pipeline's config file with the command's overrides must load and validate into the pipeline's
own config class, and its flags must be options of the pipeline's parser; a `raymoe` verb's
arguments must parse with the `raymoe` parser; a `make` target must exist in the Makefile; a
`python -m` module must accept the command's flags (`--help` lists them).
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BLOCK = re.compile(r"<!-- runnable -->\n```bash\n(.*?)```", re.S)


def readme_commands() -> list[str]:
    """The commands of the runnable blocks: comments dropped, continued lines joined."""
    text = (ROOT / "README.md").read_text()
    commands = []
    for block in BLOCK.findall(text):
        joined = block.replace("\\\n", " ")
        for line in joined.splitlines():
            line = line.split(" # ")[0].strip() if not line.lstrip().startswith("#") else ""
            if line:
                commands.append(line)
    return commands


COMMANDS = readme_commands()


def test_the_readme_has_runnable_blocks():
    assert len(COMMANDS) >= 20, COMMANDS


def check_pipeline(name: str, argv: list[str]) -> None:
    """`--config FILE overrides...` loads into the pipeline's config class; other flags exist."""
    from raymoe.cli_pipelines import config_class
    from raymoe.config import load_config

    assert argv[0] == "--config", argv
    config_file, rest = argv[1], argv[2:]
    overrides = [a for a in rest if not a.startswith("--")]
    flags = [a for a in rest if a.startswith("--")]
    load_config(config_class(name), ROOT / config_file, overrides)
    if flags:
        usage = subprocess.run(
            [sys.executable, "-m", f"pipelines.{name}", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120
        ).stdout
        for flag in flags:
            assert flag.split("=")[0] in usage, f"{name} has no option {flag}"


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command_is_accepted(command):
    from raymoe.cli import build_parser
    from raymoe.cli_pipelines import PIPELINES

    words = shlex.split(command)
    if words[:2] == ["python", "-m"] and words[2].startswith("pipelines."):
        check_pipeline(words[2].removeprefix("pipelines."), words[3:])
    elif words[0] == "raymoe" and words[1] in PIPELINES:
        check_pipeline(words[1], words[2:])
    elif words[0] == "raymoe":
        # argparse exits 2 on an unknown verb or option, which fails the test.
        build_parser().parse_args(words[1:])
    elif words[0] == "make":
        targets = re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M)
        assert set(words[1:]) <= set(targets), f"Makefile has no target {words[1:]}"
    elif words[:2] == ["python", "-m"]:
        usage = subprocess.run(
            [sys.executable, "-m", words[2], "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120
        )
        assert usage.returncode == 0, usage.stderr
        for flag in (w for w in words[3:] if w.startswith("--")):
            assert flag.split("=")[0] in usage.stdout, f"{words[2]} has no option {flag}"
    else:
        pytest.fail(f"no check for README command: {command}")
