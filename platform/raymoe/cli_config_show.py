"""`raymoe config show PIPELINE`: every key of a pipeline's config with its type, default and help.

Keys are dotted as overrides take them (`optim.lr`); a list of sections shows its items' keys as
`sources[].name`. The help line of a key is what its dataclass says about the field: the comment
lines right above it, a trailing `# ...` on its line, or its entry in an `Attributes:` / `Args:`
section of the class docstring. A field nobody documented gets no help line.

    raymoe config show train
    raymoe config show train --yaml > my-train.yaml     # required keys open, the rest commented
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import io
import json
import re
import sys
import textwrap
import tokenize
import types
import typing
from dataclasses import dataclass
from typing import Any

REQUIRED = object()


@dataclass
class Key:
    """One configurable key: `type` as written in annotations, `default` REQUIRED when required."""

    key: str
    type: str
    default: Any
    help: str
    # Set on a section (a nested config): its class docstring's first line.
    section: bool = False


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    return re.sub(r"\b(typing|collections\.abc|raymoe\.[\w.]+)\.", "", str(tp)).replace("NoneType", "None")


def _docstring_entries(cls: type) -> dict[str, str]:
    """`name: text` entries of the `Attributes:` / `Args:` sections of `cls`'s docstring."""
    entries: dict[str, list[str]] = {}
    section_indent = None  # indentation of the section header while inside one
    current, entry_indent = None, 0
    for line in inspect.cleandoc(cls.__doc__ or "").splitlines():
        stripped = line.strip()
        here = len(line) - len(line.lstrip())
        if re.fullmatch(r"(Attributes|Args|Arguments|Fields):", stripped):
            section_indent, current = here, None
            continue
        if section_indent is None or not stripped:
            continue
        if here <= section_indent:
            section_indent = None
            continue
        m = re.fullmatch(r"(\w+)(?: \([^)]*\))?: ?(.*)", stripped)
        if m and (current is None or here <= entry_indent):
            current, entry_indent = m.group(1), here
            entries[current] = [m.group(2)]
        elif current is not None:
            entries[current].append(stripped)
    return {name: " ".join(t for t in text if t) for name, text in entries.items()}


@functools.cache
def field_help(cls: type) -> dict[str, str]:
    """Help text per field of dataclass `cls` (and its bases) from its source; {} without source."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass is object or not dataclasses.is_dataclass(klass):
            continue
        out.update(_docstring_entries(klass))
        out.update(_comment_help(klass))
    return {k: v for k, v in out.items() if v}


def _comment_help(cls: type) -> dict[str, str]:
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    lines = source.splitlines()
    trailing: dict[int, str] = {}  # line number -> comment after code on that line
    code_lines: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT and tok.start[0] in code_lines:
            trailing[tok.start[0]] = tok.string.lstrip("#").strip()
        elif tok.type not in (
            tokenize.COMMENT,
            tokenize.NL,
            tokenize.NEWLINE,
            tokenize.INDENT,
            tokenize.DEDENT,
            tokenize.ENCODING,
        ):
            code_lines.update(range(tok.start[0], tok.end[0] + 1))
    class_def = ast.parse(source).body[0]
    if not isinstance(class_def, ast.ClassDef):
        return {}
    body = class_def.body
    out: dict[str, str] = {}
    for i, node in enumerate(body):
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above: list[str] = []
        above_line = node.lineno - 1  # 1-based; lines[] is 0-based
        while above_line >= 1 and lines[above_line - 1].strip().startswith("#"):
            above.insert(0, lines[above_line - 1].strip().lstrip("#").strip())
            above_line -= 1
        parts = above + [
            trailing[ln] for ln in range(node.lineno, (node.end_lineno or node.lineno) + 1) if ln in trailing
        ]
        after = body[i + 1] if i + 1 < len(body) else None
        if isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str):
            parts.append(inspect.cleandoc(after.value.value).replace("\n", " "))
        if text := " ".join(p for p in parts if p):
            out[node.target.id] = text
    return out


def _nested(tp: Any) -> tuple[type | None, str]:
    """(dataclass, key suffix) when `tp` is a config section or a list of them."""
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return tp, ""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (list, tuple) and args and isinstance(args[0], type) and dataclasses.is_dataclass(args[0]):
        return args[0], "[]"
    if origin in (typing.Union, types.UnionType):
        classes = [a for a in args if isinstance(a, type) and dataclasses.is_dataclass(a)]
        if len(classes) == 1:
            return classes[0], ""
    return None, ""


def _default(field: dataclasses.Field, instance: Any) -> Any:
    if instance is not None:
        return getattr(instance, field.name)
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return REQUIRED


def config_keys(cls: type, prefix: str = "", instance: Any = None) -> list[Key]:
    """Every key of dataclass `cls`, sections first-level included, depth first in field order.

    Args:
        cls: a config dataclass.
        prefix: dotted path of `cls` inside the whole config ("" at the top).
        instance: the section's default value when its parent builds one (its values are the
            defaults: a parent may set them differently from the section's own defaults).
    """
    hints = typing.get_type_hints(cls)
    helps = field_help(cls)
    keys: list[Key] = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        default = _default(f, instance)
        nested, suffix = _nested(tp)
        if nested is not None:
            doc = helps.get(f.name) or inspect.cleandoc(nested.__doc__ or "").split("\n\n")[0].replace("\n", " ")
            keys.append(Key(key, _type_name(tp), default, doc, section=True))
            sub_default = default if suffix == "" and dataclasses.is_dataclass(default) else None
            keys += config_keys(nested, f"{key}{suffix}.", sub_default)
        else:
            keys.append(Key(key, _type_name(tp), default, helps.get(f.name, "")))
    return keys


def _yaml_value(value: Any) -> str:
    import yaml

    from raymoe.config import to_dict

    text = yaml.safe_dump(to_dict(value), default_flow_style=True, width=1 << 20).strip()
    return text[:-4].strip() if text.endswith("\n...") else text


def format_table(cls: type, keys: list[Key]) -> str:
    """Human-readable listing: `key  type  default` (or `required`) and the help lines under it."""
    doc = inspect.cleandoc(cls.__doc__ or "").split("\n\n")[0].replace("\n", " ")
    key_w = min(max(len(k.key) for k in keys), 40)
    type_w = min(max(len(k.type) for k in keys), 24)
    lines = [f"{cls.__name__}: {doc}" if doc else cls.__name__, "", f"{'KEY':<{key_w}}  {'TYPE':<{type_w}}  DEFAULT"]
    for k in keys:
        if k.section:
            value = "(required section)" if k.default is REQUIRED else "(section)"
        else:
            value = "required" if k.default is REQUIRED else _yaml_value(k.default)
        lines.append(f"{k.key:<{key_w}}  {k.type:<{type_w}}  {value}".rstrip())
        if k.help:
            lines += textwrap.wrap(k.help, width=100, initial_indent="    ", subsequent_indent="    ")
    return "\n".join(lines)


def format_yaml(cls: type, keys: list[Key]) -> str:
    """A commented YAML skeleton: required keys open (to fill in), optional ones commented out
    with their default, every key's help above it."""
    doc = inspect.cleandoc(cls.__doc__ or "").split("\n\n")[0].replace("\n", " ")
    lines = [
        f"# {cls.__name__}: {doc}",
        "# Required keys are left open (null until filled in); the others show their default, commented out.",
    ]
    required_prefixes = {""}  # sections whose keys are written open (every ancestor required)
    item_started: set[str] = set()  # lists of sections whose item has its `- ` already
    for k in keys:
        parent, _, name = k.key.rpartition(".")
        segments = k.key.split(".")[:-1]
        # Column of the key: 2 per level, 2 more inside each list item (after its `- `).
        column = 2 * len(segments) + 2 * sum(seg.endswith("[]") for seg in segments)
        is_open = (parent + "." if parent else "") in required_prefixes and k.default is REQUIRED
        if "[]" in k.key:
            is_open = False  # the keys one list item takes: shown, not filled in
        mark = "" if is_open else "# "
        for text in textwrap.wrap(k.help, width=96 - column):
            lines.append(f"{' ' * column}# {text}")
        if parent.endswith("[]"):
            bullet = "  " if parent in item_started else "- "
            item_started.add(parent)
            head = f"{' ' * (column - 2)}{mark}{bullet}{name}:"
        else:
            head = f"{' ' * column}{mark}{name}:"
        if k.section:
            if is_open:
                required_prefixes.add(k.key + ".")
            lines.append(
                head
                + (
                    f"  # a list ({k.type}); each item takes the keys below"
                    if k.type.startswith(("list", "tuple"))
                    else ""
                )
            )
        elif k.default is REQUIRED:
            lines.append(f"{head}  # required, {k.type}")
        else:
            lines.append(f"{head} {_yaml_value(k.default)}")
    return "\n".join(lines)


def add_config_command(sub: argparse._SubParsersAction) -> None:
    from raymoe.cli_pipelines import PIPELINES

    p = sub.add_parser(
        "config",
        help="every key of a pipeline's config: type, default, help",
        description="Configs are YAML files read into dataclasses; every key can also be set "
        "on the command line as key.sub=value.",
    )
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    show = actions.add_parser(
        "show",
        help="every key of PIPELINE's config",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Prints every key (dotted, as overrides take it) with its type, its default or\n"
        "`required`, and the help the config class gives it.\n\nexamples:\n"
        "  raymoe config show train\n  raymoe config show serve --yaml > serve.yaml",
    )
    show.add_argument("pipeline", choices=list(PIPELINES), metavar="PIPELINE", help=f"one of: {', '.join(PIPELINES)}")
    fmt = show.add_mutually_exclusive_group()
    fmt.add_argument("--yaml", action="store_true", help="a commented YAML skeleton to start a config from")
    fmt.add_argument("--json", action="store_true", help="one JSON object per key (key, type, default, required, help)")

    def run(args: argparse.Namespace) -> int:
        from raymoe.cli_pipelines import config_class
        from raymoe.config import to_dict

        cls = config_class(args.pipeline)
        keys = config_keys(cls)
        if args.json:
            for k in keys:
                required = k.default is REQUIRED
                print(
                    json.dumps(
                        {
                            "key": k.key,
                            "type": k.type,
                            "section": k.section,
                            "required": required,
                            "default": None if required else to_dict(k.default),
                            "help": k.help,
                        }
                    )
                )
        elif args.yaml:
            print(format_yaml(cls, keys))
        else:
            print(format_table(cls, keys))
        sys.stdout.flush()
        return 0

    show.set_defaults(func=run)
