"""Run configuration: YAML files -> dataclasses, dotted overrides, validation at the edge.

Every component owns a `@dataclass(kw_only=True)` `<Thing>Config`; a job config composes them.
`from_dict` builds one from plain data and names the dotted key of anything wrong (unknown keys,
missing required fields, wrong types), so a bad run fails before any worker starts. `to_dict`
gives plain data back: configs cross Ray process boundaries as dicts.
"""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import dataclasses
import math
import os
import re
import sys
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TypeVar

import yaml

# Defined beside the model config (which must not import YAML) and re-exported here: one error
# class for run and model configs, so `from_dict` reports the models' checks too.
from raymoe.models.config_checks import ConfigError, require

T = TypeVar("T")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Checks `value` against the annotation `tp`, converting only where lossless (int -> float)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [arg for arg in args if arg is not type(None)]
        if len(options) == 1:  # Optional[X]: X's own message names the nested key that is wrong
            return _coerce(value, options[0], key)
        for arg in options:
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{key}: expected one of {list(args)}, got {value!r}")
        return value
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, prefix=key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        val_tp = args[1] if len(args) == 2 else Any
        return {k: _coerce(v, val_tp, f"{key}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    return value


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Builds dataclass `cls` from plain data, naming the dotted key of any problem.

    Args:
        cls: the dataclass to build.
        data: plain mapping (from YAML or `to_dict`).
        prefix: dotted path of `data` inside the whole config, for messages.

    Returns:
        An instance of `cls`; its `__post_init__` validation has run.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or cls.__name__}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]  # cls is a dataclass
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown key {where}{unknown[0]} for {cls.__name__}; known keys: {sorted(fields)}")
    kwargs = {}
    for name, field in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], key)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required key {key} for {cls.__name__}")
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        if prefix:
            raise ConfigError(qualify(prefix, str(exc), fields)) from None
        raise


_LEADING_KEY = re.compile(r"[A-Za-z_][\w\-]*(?:\[[^\]]*\])?(?:\.[A-Za-z_][\w\-]*(?:\[[^\]]*\])?)*")
_KEY_PHRASES = ("unknown key ", "missing required key ")


def _unindexed(part: str) -> str:
    return part.split("[", 1)[0]


def qualify(prefix: str, message: str, fields: Iterable[str] = ()) -> str:
    """`message` from the dataclass at dotted `prefix`, with the key it starts with made complete.

    A dataclass names its own fields either bare (`num_slots must be ...`) or under the section
    it usually sits in (`engine.num_slots must be ...`); at `app.engine` both become
    `app.engine.num_slots ...`, never `app.engine.engine.num_slots`. A section name that differs
    from where the dataclass sits is replaced (`drift.seed` at `detectors` -> `detectors.seed`).
    List indices match any index (`sources[code].weight` at `sources[0]` keeps its name); a key
    named from further out than `prefix` (`app.traffic.x` at `traffic`) is left as it is.

    Args:
        prefix: dotted key of the dataclass inside the whole config.
        message: the ConfigError message its `__post_init__` raised.
        fields: the dataclass's field names (a message starting with one is relative to it).
    """
    for phrase in _KEY_PHRASES:
        if message.startswith(phrase):
            return phrase + qualify(prefix, message[len(phrase) :], fields)
    parts = prefix.split(".")
    match = _LEADING_KEY.match(message)
    if not match:
        return f"{prefix}: {message}"
    lead = match.group(0).split(".")
    if _unindexed(lead[0]) in set(fields):
        return f"{prefix}.{message}"
    for k in range(min(len(parts), len(lead)), 0, -1):
        if [_unindexed(p) for p in parts[-k:]] == [_unindexed(p) for p in lead[:k]]:
            return ".".join([*parts[:-k], message]) if len(parts) > k else message
    if _unindexed(parts[-1]) in [_unindexed(p) for p in lead[:-1]]:
        return message  # already named from further out (`app.traffic.x` at `traffic`)
    if len(lead) > 1:  # named under a section other than where it sits
        return f"{prefix}.{message[len(lead[0]) + 1 :]}"
    return f"{prefix}.{message}"


def to_dict(obj: Any) -> Any:
    """Plain data (dicts, lists, scalars) for a dataclass tree; inverse of `from_dict`."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Applies `key.sub=value` overrides (values parsed as YAML) to a nested mapping in place."""
    for item in overrides:
        dotted, sep, raw = item.partition("=")
        parts = dotted.strip().split(".")
        if not sep or not all(part.strip() for part in parts):
            raise ConfigError(f"override {item!r}: expected key.sub=value")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as exc:
            raise ConfigError(
                f"override {item!r}: the value is not valid YAML ({getattr(exc, 'problem', None) or exc})"
            ) from None
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {'.'.join(parts[: i + 1])} is not a mapping, got {child!r}")
            node = child
        node[parts[-1]] = value
    return data


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (YAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, typing.Hashable):
                continue  # SafeLoader's own construct_mapping names an unhashable key
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path) -> Any:
    """A YAML file's data; a missing file or bad YAML is a ConfigError naming the file and line."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {str(path)!r} is a directory; expected a YAML file")
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        with path.open(encoding="utf-8") as fh:
            return yaml.load(fh, Loader=_UniqueKeyLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config file {str(path)!r}{where}: {exc.problem or exc.context}") from None
    except (yaml.YAMLError, OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {str(path)!r}: {exc}") from None


def load_config(cls: type[T], path: str | Path, overrides: list[str] | None = None) -> T:
    """Reads a YAML run config, applies dotted overrides and validates it into `cls`."""
    data = read_yaml(path)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r}: expected a mapping at the top level, got {type(data).__name__}")
    return from_dict(cls, apply_overrides(data, list(overrides or [])))


def require_at_least(section: str, cfg: Any, **bounds: float) -> None:
    """Checks numeric fields of `cfg` against lower bounds, in the order given.

    Args:
        section: dotted key `cfg` usually sits at ("" = top level); names the field in messages.
        cfg: the dataclass being checked (from its `__post_init__`).
        **bounds: field name -> the smallest value it may take.

    Raises:
        ConfigError: `<section.field> must be >= <bound>, got <value>` for the first field below
            its bound (or not finite).
    """
    for name, low in bounds.items():
        value = getattr(cfg, name)
        key = f"{section}.{name}" if section else name
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key} must be a finite number >= {low}, got {value!r}")
        require(value >= low, f"{key} must be >= {low}, got {value!r}")


def require_positive(section: str, cfg: Any, *names: str) -> None:
    """Like `require_at_least`, for fields that must be finite and > 0 (durations, rates, sizes)."""
    for name in names:
        value = getattr(cfg, name)
        key = f"{section}.{name}" if section else name
        require(math.isfinite(value) and value > 0, f"{key} must be > 0, got {value!r}")


def require_resource(key: str, value: float, *, gpus: bool = False) -> None:
    """A Ray resource quantity (num_cpus, num_gpus, memory): finite, >= 0, at most 4 decimals
    (Ray's resource unit) and, for GPUs, a fraction of one GPU or a whole number of them."""
    require(math.isfinite(value) and value >= 0, f"{key} must be >= 0, got {value!r}")
    require(value == 0 or value >= 1e-4, f"{key}={value!r}: expected 0 or at least 0.0001 (Ray's resource unit)")
    require(
        not gpus or value <= 1 or float(value).is_integer(),
        f"{key}={value!r}: expected a fraction of one GPU or a whole number of GPUs",
    )


def same_path(a: str | Path, b: str | Path) -> bool:
    """True when two local paths name the same place (relative ones from the working directory)."""
    return os.path.normpath(os.path.abspath(a)) == os.path.normpath(os.path.abspath(b))


class _ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (`prog: message (see --help)`), exit status 2."""

    def error(self, message: str):
        print(f"{self.prog}: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


# The command name a pipeline's usage and errors show: `raymoe train` when the `raymoe` CLI runs
# the pipeline (`raymoe.cli_pipelines.run_pipeline` sets it), else the `python -m` form.
INVOKED_AS: contextvars.ContextVar[str | None] = contextvars.ContextVar("INVOKED_AS", default=None)


def job_arg_parser(cls: type, *, prog: str, description: str):
    """The command line every pipeline shares:
    `--config FILE [--storage-root ROOT] [--debug] [key.sub=value ...]`."""
    parser = _ArgumentParser(
        prog=INVOKED_AS.get() or prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, help=f"YAML file with a {cls.__name__}")
    parser.add_argument(
        "--storage-root",
        metavar="ROOT",
        default=None,
        help="where relative output paths (runs/...) go: a local directory or a pyarrow "
        "filesystem URI (default: $RAYMOE_STORAGE_ROOT, else the working directory "
        "unless it is Ray's temporary copy under `ray job submit`, else ~/raymoe)",
    )
    parser.add_argument(
        "--debug", action="store_true", help="print the traceback of a config error too (it is one line otherwise)"
    )
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-3")
    return parser


def load_job_config(cls: type[T], args: argparse.Namespace) -> T:
    """The job's config from its parsed command line (`job_arg_parser`), with its output and
    run-artifact paths resolved against the storage root (`raymoe.storage`), so the checks
    that follow see absolute paths."""
    from raymoe.storage import resolve_job_config

    return resolve_job_config(load_config(cls, args.config, args.overrides), args.storage_root)


@contextlib.contextmanager
def exit_on_config_error(debug: bool = False):
    """Runs a job's checks before anything starts: a ConfigError inside prints one line,
    `config error: ...`, to stderr and exits with status 2 (after the traceback, with `debug`)."""
    try:
        yield
    except ConfigError as exc:
        if debug:
            import traceback

            traceback.print_exc()
        print(f"config error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def parse_job_args(cls: type[T], argv: list[str] | None, *, prog: str, description: str, check=None) -> T:
    """Parses the shared command line, loads and validates the config, resolves its storage paths
    (`load_job_config`) and runs `check(cfg)`.

    A ConfigError from either is reported as one line, `config error: ...`, with exit status 2,
    before anything is started (`--debug` adds the traceback).
    """
    args = job_arg_parser(cls, prog=prog, description=description).parse_args(argv)
    with exit_on_config_error(args.debug):
        cfg = load_job_config(cls, args)
        if check is not None:
            check(cfg)
    return cfg
