"""Where a job's outputs go: one storage root, and which config keys resolve against it.

Under `ray job submit --working-dir .` a job runs inside Ray's unpacked copy of the working
directory (`<ray temp>/session_*/runtime_resources/working_dir_files/_ray_pkg_*`), which Ray
deletes with its session: a relative output path there is lost. So every path a job writes (and
every run artifact one job reads from another) is resolved, right after the config loads, against
a storage root:

    --storage-root ROOT           the job's command line, else
    RAYMOE_STORAGE_ROOT=ROOT      the environment (e.g. `--runtime-env-json '{"env_vars": ...}'`), else
    the working directory         when it is not inside a Ray temporary folder (a run from the repo
                                  keeps writing runs/... where it always did), else
    ~/raymoe                      (DEFAULT_ROOT)

A root is a local path (made absolute) or a pyarrow filesystem URI (s3://, gs://, hdfs://; file://
is a local path). Shipped inputs (data/...) stay relative: they come with the working directory.
Keys a component can only use locally refuse a URI with a one-line ConfigError rather than pretend.
Every job prints what it wrote as `wrote <what>: <absolute path or URI>` (`print_wrote`).
"""

from __future__ import annotations

import os
import posixpath
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

from raymoe.config import ConfigError, from_dict, to_dict

T = TypeVar("T")

STORAGE_ROOT_ENV = "RAYMOE_STORAGE_ROOT"
# The root when the working directory is Ray's temporary copy and none is given: in the user's
# home, which no Ray session cleanup, temp-dir reaper or reboot removes, and where a user looks.
# On a multi-node cluster this is each node's own disk: give a shared root there (a volume every
# node mounts, or a URI for checkpoints).
DEFAULT_ROOT = "~/raymoe"

# Run storage: per job config class, the dotted keys (`[]` = every item of a list) holding what the
# job writes, or a run artifact another job wrote (ingest output, checkpoints, exported models,
# adapters, traffic windows, placements). Relative values resolve against the storage root.
STORAGE_KEYS: dict[str, tuple[str, ...]] = {
    "IngestConfig": ("output_dir", "tokenizer.path"),
    "TrainConfig": ("data.path", "checkpoint.uri", "storage_path", "history_path"),
    "FinetuneConfig": ("base", "debug_base", "output_dir", "storage_path"),
    "FederatedConfig": ("base", "debug_base", "output_dir"),
    "ServeJobConfig": ("app.model_path", "debug_artifact", "app.lora_dir", "app.traffic.output_dir"),
    "DriftJobConfig": (
        "output_dir",
        "current.dir",
        "reference.paths",
        "reference.manifest",
        "quality.artifact",
        "quality.adapter",
        "debug_traffic.dir",
        "debug_traffic.artifact",
    ),
    "RebalanceJobConfig": (
        "output_dir",
        "windows.dir",
        "trace.path",
        "model_path",
        "placement.current",
        "debug_traffic.dir",
        "debug_traffic.artifact",
    ),
    "DemoConfig": ("work_dir",),
}

# Working-directory inputs: files shipped with the code (data/...) or given by the user, read
# relative to the working directory (Ray's copy of it under `ray job submit`); left as they are.
WORKING_DIR_KEYS: dict[str, tuple[str, ...]] = {
    "IngestConfig": ("sources[].paths",),
    "TrainConfig": (),
    "FinetuneConfig": ("data.path", "eval_path"),
    "FederatedConfig": ("silos[].data_path", "eval_path"),
    "ServeJobConfig": ("app.api_key_file",),
    "DriftJobConfig": ("quality.eval_path",),
    "RebalanceJobConfig": (),
    "DemoConfig": (),
}

# Storage keys whose component reads and writes through pyarrow / Ray Train storage, so a URI
# works; every other storage key is used with local file APIs and refuses one.
URI_KEYS: dict[str, tuple[str, ...]] = {
    "TrainConfig": ("checkpoint.uri", "storage_path"),
    "FinetuneConfig": ("storage_path",),
}


def is_uri(path: str) -> bool:
    """True for `scheme://...` (a pyarrow filesystem URI); local paths have no scheme."""
    return "://" in path


def _local(path: str) -> str:
    """A file:// URI as the local path it names; anything else unchanged."""
    if path.startswith("file://"):
        return unquote(urlsplit(path).path) or "/"
    return path


def ray_temp_dir() -> str:
    """Ray's default temporary folder here, as Ray picks it: `$RAY_TMPDIR/ray`, else `$TMPDIR/ray`,
    else `/tmp/ray`."""
    base = os.environ.get("RAY_TMPDIR") or tempfile.gettempdir()
    return os.path.realpath(os.path.join(base, "ray"))


def inside_ray_temp(path: str) -> bool:
    """True when `path` is in Ray's temporary folder, or in a session's unpacked runtime
    resources (`session_*/runtime_resources/...`, wherever `ray start --temp-dir` put them)."""
    real = os.path.realpath(path)
    parts = Path(real).parts
    if "runtime_resources" in parts and any(
        p.startswith("session_") for p in parts[: parts.index("runtime_resources")]
    ):
        return True
    temp = ray_temp_dir()
    return real == temp or real.startswith(temp + os.sep)


def choose_root(explicit: str | None = None) -> tuple[str, str]:
    """The storage root and where it came from (see the module docstring).

    Args:
        explicit: `--storage-root`, if given.

    Returns:
        (root, source): root absolute (local) or a URI without a trailing slash; source is
        "--storage-root", STORAGE_ROOT_ENV, "working directory" or "default".

    Raises:
        ConfigError: a local root given inside Ray's temporary folders (Ray deletes it).
    """
    given = [(explicit, "--storage-root"), (os.environ.get(STORAGE_ROOT_ENV), STORAGE_ROOT_ENV)]
    for value, source in given:
        if not value:
            continue
        root = _local(value)
        if is_uri(root):
            return root.rstrip("/"), source
        root = os.path.abspath(os.path.expanduser(root))
        if inside_ray_temp(root):
            raise ConfigError(
                f"{source}={value!r} is inside Ray's temporary folder ({root}), which Ray "
                "deletes; expected an absolute path outside it or a URI"
            )
        return root, source
    cwd = os.getcwd()
    if not inside_ray_temp(cwd):
        return cwd, "working directory"
    return os.path.expanduser(DEFAULT_ROOT), "default"


def resolve(path: str, root: str) -> str:
    """`path` against the storage root: relative paths joined onto it; absolute paths and URIs
    unchanged (file:// becomes its local path, `~` is expanded); "" (unset) stays "".

    Args:
        path: a config value.
        root: a `choose_root` root (absolute local path or URI).
    """
    if not path:
        return path
    path = _local(path)
    if is_uri(path):
        return path
    path = os.path.expanduser(path)
    if os.path.isabs(path):
        return path
    if is_uri(root):
        return f"{root}/{posixpath.normpath(path)}"
    return os.path.normpath(os.path.join(root, path))


def _apply(data: Any, parts: list[str], key: str, fn: Callable[[str, str], str]) -> None:
    """Replaces the str (or each str of the list) at dotted `parts` of `data` by fn(key, value)."""
    head, *rest = parts
    many = head.endswith("[]")
    name = head[:-2] if many else head
    if not isinstance(data, dict) or data.get(name) is None:
        return  # an optional section left out (e.g. debug_traffic: null)
    if many:
        for i, item in enumerate(data[name]):
            _apply(item, rest, f"{key}{name}[{i}].", fn)
    elif rest:
        _apply(data[name], rest, f"{key}{name}.", fn)
    elif isinstance(data[name], list):
        data[name] = [fn(f"{key}{name}", v) for v in data[name]]
    else:
        data[name] = fn(f"{key}{name}", data[name])


def resolve_config(cfg: T, root: str) -> T:
    """A copy of job config `cfg` with its STORAGE_KEYS resolved against `root`; configs of
    other classes are returned as they are.

    Raises:
        ConfigError: a storage key resolved to a URI where the job uses local files only.
    """
    name = type(cfg).__name__
    if name not in STORAGE_KEYS:
        return cfg
    data = to_dict(cfg)
    for dotted in STORAGE_KEYS[name]:
        uri_ok = dotted in URI_KEYS.get(name, ())

        def fix(key: str, value: str, uri_ok: bool = uri_ok) -> str:
            out = resolve(value, root)
            if is_uri(out) and not uri_ok:
                raise ConfigError(
                    f"{key}={out!r}: this job reads and writes {key} with local file APIs "
                    "only; expected an absolute local path (a volume every node mounts) or "
                    "a local storage root"
                )
            return out

        _apply(data, dotted.split("."), "", fix)
    return from_dict(type(cfg), data)


def resolve_job_config(cfg: T, explicit_root: str | None = None) -> T:
    """`resolve_config` against `choose_root(explicit_root)`; says on stderr when the root is the
    default because the working directory is Ray's temporary copy."""
    root, source = choose_root(explicit_root)
    if source == "default" and type(cfg).__name__ in STORAGE_KEYS:
        print(
            f"storage root: {root} (the working directory {os.getcwd()} is Ray's temporary copy, deleted "
            f"with its session; set {STORAGE_ROOT_ENV} or --storage-root to choose)",
            file=sys.stderr,
        )
    return resolve_config(cfg, root)


def location(path: str | os.PathLike) -> str:
    """A path as printed for the user: absolute (local) or the URI as it is."""
    text = os.fspath(path)
    return text if is_uri(text) else os.path.abspath(text)


def print_wrote(what: str, path: str | os.PathLike) -> None:
    """Prints `wrote <what>: <absolute path or URI>` to stdout (every job's last lines)."""
    print(f"wrote {what}: {location(path)}", flush=True)
