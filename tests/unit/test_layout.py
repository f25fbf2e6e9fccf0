"""Package layout: raymoe lives in platform/ without shadowing the stdlib module `platform`, and each
of its packages imports only what the dependency direction of docs/DESIGN allows."""

import ast
import importlib
import pathlib
import subprocess
import sys

import pytest

RAYMOE = pathlib.Path(__file__).resolve().parents[2] / "platform" / "raymoe"
STDLIB = "stdlib"  # any module of `sys.stdlib_module_names`

# What each package (or top-level module) under raymoe may import: top-level third-party modules,
# raymoe packages / modules, and STDLIB. Read from every import statement of its files (module-level
# and inside functions). A new import that is not listed here fails the test: add it only if the
# dependency direction allows it (models <- inference, parallel <- train, serve, federated;
# nothing imports pipelines but the CLI's dispatcher).
ALLOWED: dict[str, set[str]] = {
    "raymoe": {STDLIB},  # the package root: its version only
    # The maths and the checkpoint format. atomic_io is a stdlib-only leaf (temp file, fsync,
    # rename) that checkpoint writers share.
    "models": {STDLIB, "torch", "safetensors", "raymoe.models", "raymoe.atomic_io"},
    # How a built model runs fast, applied from outside the model.
    "inference": {STDLIB, "torch", "raymoe.models", "raymoe.inference"},
    # Placement, process groups, all-to-all; never train or serve. config: layout validation.
    "parallel": {STDLIB, "torch", "raymoe.config", "raymoe.parallel"},
    # data -> monitor: ingest counts quarantined records under the metric names defined there;
    # ray: ingest tasks; torch: the loaders yield tensors; jinja2: chat templates.
    "data": {
        STDLIB,
        "jinja2",
        "numpy",
        "pyarrow",
        "ray",
        "tokenizers",
        "torch",
        "tqdm",
        "raymoe.atomic_io",
        "raymoe.config",
        "raymoe.data",
        "raymoe.monitor",
    },
    # train -> serve: the fine-tuning demo builds a debug artifact (serve.debug_artifact);
    # artifact_check: a fine-tuning config checks its base artifact up front.
    "train": {
        STDLIB,
        "pyarrow",
        "ray",
        "torch",
        "raymoe.artifact_check",
        "raymoe.atomic_io",
        "raymoe.config",
        "raymoe.data",
        "raymoe.models",
        "raymoe.monitor",
        "raymoe.parallel",
        "raymoe.precision",
        "raymoe.serve",
        "raymoe.train",
    },
    # yaml: `--set key=value` overrides of the app's arguments; safetensors: expert reloads;
    # cpu_allocator: the engine keeps freed memory for the next step.
    "serve": {
        STDLIB,
        "fastapi",
        "numpy",
        "pyarrow",
        "pydantic",
        "ray",
        "safetensors",
        "starlette",
        "torch",
        "yaml",
        "raymoe.atomic_io",
        "raymoe.config",
        "raymoe.cpu_allocator",
        "raymoe.data",
        "raymoe.inference",
        "raymoe.models",
        "raymoe.monitor",
        "raymoe.parallel",
        "raymoe.precision",
        "raymoe.serve",
    },
    # federated -> train: silos reuse the adapter trainer and its optimizer config;
    # -> serve: the demo's debug artifact; artifact_check: the job checks its base artifact up
    # front; opacus: the privacy accountant.
    "federated": {
        STDLIB,
        "cryptography",
        "numpy",
        "opacus",
        "ray",
        "scipy",
        "torch",
        "raymoe.artifact_check",
        "raymoe.atomic_io",
        "raymoe.config",
        "raymoe.data",
        "raymoe.federated",
        "raymoe.models",
        "raymoe.monitor",
        "raymoe.parallel",
        "raymoe.serve",
        "raymoe.train",
    },
    # Imports no model, train or serve code; ray: metric export and drift actions' job submission;
    # artifact_check: the drift job checks its artifact before it starts.
    "monitor": {
        STDLIB,
        "grafana_client",
        "matplotlib",
        "niquests",
        "numpy",
        "pyarrow",
        "ray",
        "scipy",
        "yaml",
        "raymoe.artifact_check",
        "raymoe.atomic_io",
        "raymoe.config",
        "raymoe.monitor",
    },
    # deploy -> serve: the rebalance job applies a placement to a running app; torch: the CPU
    # fleet probe times GEMMs; monitor: load traces read the sampled traffic windows.
    "deploy": {
        STDLIB,
        "kubernetes",
        "numpy",
        "scipy",
        "torch",
        "tqdm",
        "urllib3",
        "yaml",
        "raymoe.atomic_io",
        "raymoe.config",
        "raymoe.deploy",
        "raymoe.models",
        "raymoe.monitor",
        "raymoe.parallel",
        "raymoe.serve",
    },
    # The main job end to end (`raymoe demo`): like pipelines, it calls every stage's library code.
    # demo drives every stage; psutil measures the whole demo's peak RSS; console draws its bars.
    "demo": {
        STDLIB,
        "numpy",
        "psutil",
        "ray",
        "raymoe.artifact_check",
        "raymoe.atomic_io",
        "raymoe.config",
        "raymoe.console",
        "raymoe.data",
        "raymoe.demo",
        "raymoe.deploy",
        "raymoe.federated",
        "raymoe.models",
        "raymoe.monitor",
        "raymoe.ray_runtime",
        "raymoe.serve",
        "raymoe.train",
    },
    # Top-level modules. config re-exports the model config's checks (one ConfigError class).
    "atomic_io": {STDLIB},
    # The compute dtype by the CPU's flags (train and serve decide with it).
    "precision": {STDLIB, "torch"},
    # Every job's progress bars and result lines.
    "console": {STDLIB, "tqdm"},
    # config -> storage: a job's config is resolved against the storage root as it loads.
    "config": {STDLIB, "yaml", "raymoe.models", "raymoe.storage"},
    # Where a job's outputs go (the storage root and which config keys resolve against it).
    "storage": {STDLIB, "raymoe.config"},
    "cpu_allocator": {STDLIB},
    "ray_runtime": {STDLIB, "ray", "raymoe.config"},
    "artifact_check": {STDLIB, "tokenizers", "raymoe.config", "raymoe.models"},
    # The `raymoe` CLI sits on top, like pipelines: its verbs reach every room.
    "cli": {
        STDLIB,
        "raymoe.cli_chat",
        "raymoe.cli_config_show",
        "raymoe.cli_inspect",
        "raymoe.cli_pipelines",
        "raymoe.deploy",
        "raymoe.models",
        "raymoe.monitor",
        "raymoe.train",
    },
    "cli_chat": {STDLIB, "torch", "raymoe.data", "raymoe.serve"},
    "cli_config_show": {STDLIB, "yaml", "raymoe.cli_pipelines", "raymoe.config"},
    "cli_inspect": {STDLIB, "raymoe.cli_inspect_describe"},
    # `raymoe inspect`'s readers: the manifests of checkpoints, artifacts, adapters and ingest outputs.
    "cli_inspect_describe": {
        STDLIB,
        "raymoe.atomic_io",
        "raymoe.config",
        "raymoe.data",
        "raymoe.models",
        "raymoe.train",
    },
    # The one place that imports pipelines: `raymoe <pipeline>` runs `pipelines.<name>.main`.
    # config: the command name a pipeline's usage shows (`raymoe train`).
    "cli_pipelines": {STDLIB, "pipelines", "raymoe.config"},
}


def _owner(path: pathlib.Path) -> str:
    """The ALLOWED key of a file: its package under raymoe, or its module name at the top."""
    rel = path.relative_to(RAYMOE)
    if len(rel.parts) > 1:
        return rel.parts[0]
    return "raymoe" if rel.stem == "__init__" else rel.stem


def _imported_modules(path: pathlib.Path) -> list[str]:
    """Absolute dotted names of every module `path` imports (relative imports resolved)."""
    package = ["raymoe", *path.relative_to(RAYMOE).parent.parts]
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            # `from raymoe import models`: the names may be modules themselves.
            names += [f"{module}.{alias.name}" for alias in node.names] if module == "raymoe" else [module]
    return names


def _dependency(module: str) -> str:
    """The ALLOWED entry an import falls under: STDLIB, a top-level name, or raymoe.<package>."""
    top, *rest = module.split(".")
    if top == "raymoe":
        return f"raymoe.{rest[0]}" if rest and rest[0] != "__version__" else "raymoe"
    return STDLIB if top in sys.stdlib_module_names else top


def _all_imports() -> dict[str, dict[str, set[str]]]:
    """{owner: {dependency: files importing it}} over every .py file under raymoe."""
    found: dict[str, dict[str, set[str]]] = {}
    for path in sorted(RAYMOE.rglob("*.py")):
        for module in _imported_modules(path):
            found.setdefault(_owner(path), {}).setdefault(_dependency(module), set()).add(str(path.relative_to(RAYMOE)))
    return found


def test_stdlib_platform_is_not_shadowed():
    import platform

    import raymoe

    assert callable(platform.system) and platform.system()
    assert pathlib.Path(raymoe.__file__).parent.parent.name == "platform"
    assert not (pathlib.Path(raymoe.__file__).parent.parent / "__init__.py").exists()


def test_every_package_has_an_allow_list():
    # Prepare
    owners = {_owner(path) for path in RAYMOE.rglob("*.py")}
    # Execute
    missing = owners - set(ALLOWED)
    # Assert
    assert not missing, f"add an ALLOWED entry for {sorted(missing)} in {__file__}"


def test_packages_import_only_what_their_allow_list_names():
    # Execute
    found = _all_imports()
    # Assert
    wrong = {
        f"{owner} imports {dep} ({', '.join(sorted(files))})"
        for owner, deps in found.items()
        for dep, files in deps.items()
        if owner in ALLOWED and dep not in ALLOWED[owner]
    }
    assert not wrong, "imports outside the allow-list:\n" + "\n".join(sorted(wrong))


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("import torch.nn.functional as F", {"torch"}),
        ("def f():\n    from raymoe.train.worker import run_worker", {"raymoe.train"}),
        ("from raymoe import config, models", {"raymoe.config", "raymoe.models"}),
        ("from . import moe\nfrom .kv_cache import KVCache", {"raymoe.models"}),
        ("from __future__ import annotations\nimport json, os.path", {STDLIB}),
    ],
    ids=["third-party", "inside-a-function", "from-raymoe", "relative", "stdlib"],
)
def test_the_scanner_sees_every_kind_of_import(tmp_path, monkeypatch, source, expected):
    # Prepare: a file inside raymoe/models (relative imports resolve against its package)
    monkeypatch.setattr(sys.modules[__name__], "RAYMOE", tmp_path)
    path = tmp_path / "models" / "probe.py"
    path.parent.mkdir()
    path.write_text(source)
    # Execute
    deps = {_dependency(m) for m in _imported_modules(path)}
    # Assert
    assert deps == expected


def test_reading_a_config_imports_no_torch():
    # `raymoe.config` re-exports `raymoe.models.config_checks`; the models package loads its
    # torch modules on first use, so config readers (planner, monitor, scheduler) stay light.
    code = "import sys, raymoe.config; print(sorted(m for m in ('torch', 'ray', 'safetensors') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_console_script_is_declared():
    meta = importlib.metadata.entry_points(group="console_scripts")
    assert any(ep.name == "raymoe" and ep.value == "raymoe.cli:main" for ep in meta)
