"""YAML text with a comment above the fields that need one, as the KubeRay samples are written.

A manifest is built as plain dicts, lists and scalars; a value wrapped in `Note(value, why)` gets
`# why` on the line(s) above its key (or above its `- ` in a list). `emit` writes the text,
`plain` strips the notes. `yaml.safe_load(emit(tree)) == plain(tree)` holds for every tree the
renderers build (tested), so the comments can never change what Kubernetes receives.

Scalars are written by PyYAML's own emitter (it quotes "0", "true", "1.0" and the like);
multi-line strings become literal blocks (`|`, `|-`), which keeps embedded YAML
(`serveConfigV2`), rule files and dashboard JSON readable in the manifest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

INDENT = 2


@dataclass(frozen=True)
class Note:
    """`value` with the reason it is set, written as a comment above it."""

    value: Any
    why: str


def plain(tree: Any) -> Any:
    """The tree without notes: what the YAML text parses back to."""
    if isinstance(tree, Note):
        return plain(tree.value)
    if isinstance(tree, dict):
        return {k: plain(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [plain(v) for v in tree]
    return tree


def _scalar(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=10**9, allow_unicode=True)
    if text.endswith("\n...\n"):
        text = text[: -len("\n...\n")]
    return text.rstrip("\n")


def _comment(why: str, pad: str) -> list[str]:
    return [f"{pad}# {line}".rstrip() for line in why.splitlines()]


def _block(text: str) -> str:
    """A literal block scalar header (`|` keeps one final newline, `|-` none)."""
    if text[:1] in (" ", "\t") or text.endswith("\n\n"):
        raise ValueError(f"multi-line string not writable as a plain literal block: {text[:40]!r}")
    return "|" if text.endswith("\n") else "|-"


def _is_block(value: Any) -> bool:
    return isinstance(value, str) and "\n" in value


def _block_lines(text: str, pad: str) -> list[str]:
    body = text[:-1] if text.endswith("\n") else text
    return [f"{pad}{line}" if line else "" for line in body.split("\n")]


def _emit_value(key_prefix: str, value: Any, depth: int, out: list[str]) -> None:
    """Writes `key_prefix` (`key:` or `-`) followed by `value` at `depth`."""
    pad = " " * (INDENT * (depth + 1))
    if isinstance(value, dict) and value:
        out.append(key_prefix)
        _emit_dict(value, depth + 1, out)
    elif isinstance(value, list) and value:
        out.append(key_prefix)
        _emit_list(value, depth + 1, out)
    elif _is_block(value):
        out.append(f"{key_prefix} {_block(value)}")
        out.extend(_block_lines(value, pad))
    else:
        out.append(f"{key_prefix} {_scalar(value)}")


def _emit_dict(tree: dict, depth: int, out: list[str], first_prefix: str | None = None) -> None:
    pad = " " * (INDENT * depth)
    for i, (key, value) in enumerate(tree.items()):
        if isinstance(value, Note):
            # The first key of a list item sits on the `- ` line: its comment goes above that.
            out.extend(_comment(value.why, pad if first_prefix is None or i else first_prefix[:-2]))
            value = value.value
        lead = first_prefix if (i == 0 and first_prefix is not None) else pad
        _emit_value(f"{lead}{_scalar(key)}:", value, depth, out)


def _emit_list(items: list, depth: int, out: list[str]) -> None:
    pad = " " * (INDENT * depth)
    for item in items:
        if isinstance(item, Note):
            out.extend(_comment(item.why, pad))
            item = item.value
        if isinstance(item, dict) and item:
            _emit_dict(item, depth + 1, out, first_prefix=f"{pad}- ")
        elif isinstance(item, list) and item:
            raise ValueError("lists directly inside lists are not used in manifests")
        elif _is_block(item):
            inner = " " * (INDENT * (depth + 1))
            out.append(f"{pad}- {_block(item)}")
            out.extend(_block_lines(item, inner))
        else:
            out.append(f"{pad}- {_scalar(item)}")


def emit(tree: dict, header: str = "") -> str:
    """YAML text of one document (a mapping), with `header` as comment lines on top."""
    out = _comment(header, "") if header else []
    _emit_dict(tree, 0, out)
    return "\n".join(out) + "\n"


def emit_list(items: list, header: str = "") -> str:
    """YAML text of one document that is a sequence (a JSON patch file, for example)."""
    out = _comment(header, "") if header else []
    _emit_list(items, 0, out)
    return "\n".join(out) + "\n"
