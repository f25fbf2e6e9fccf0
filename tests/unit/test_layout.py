"""Package layout: raymoe lives in platform/ without shadowing the stdlib module `platform`."""

import importlib
import pathlib
import subprocess
import sys


def test_stdlib_platform_is_not_shadowed():
    import platform

    import raymoe

    assert callable(platform.system) and platform.system()
    assert pathlib.Path(raymoe.__file__).parent.parent.name == "platform"
    assert not (pathlib.Path(raymoe.__file__).parent.parent / "__init__.py").exists()


def test_models_import_no_ray_or_web_stack():
    code = "import sys, raymoe.models; print(sorted(m for m in ('ray', 'fastapi', 'pipelines') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_console_script_is_declared():
    meta = importlib.metadata.entry_points(group="console_scripts")
    assert any(ep.name == "raymoe" and ep.value == "raymoe.cli:main" for ep in meta)
