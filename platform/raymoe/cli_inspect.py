"""`raymoe inspect PATH`: what a checkpoint, artifact, adapter or ingest output is and where it came from.

Recognised (PATH may also be the manifest file inside one):

    training checkpoint root   step-* directories (`checkpoint.uri`): its steps, then the newest
    checkpoint step            a step-NNNNNNNN directory (its manifest.json)
    HF artifact                config.json + weights; raymoe_manifest.json (`raymoe export`) or
                               raymoe_merge.json (`raymoe merge`) link it to what it was made from
    LoRA adapter               adapter_config.json (peft); the run's metrics.json beside it
    ingest output              manifest.json + shards (`raymoe ingest` output_dir)

For each: step, layout, loss, architecture and size, and the lineage: the checkpoint an artifact
was exported from, the ingest output a checkpoint was trained on, with their checksums.
`--verify` also re-reads the files and checks them against those checksums. The readers are in
`raymoe.cli_inspect_describe`; this module prints what they find.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from raymoe.cli_inspect_describe import NotRecognised, describe, verify


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _run_text(run: dict[str, Any]) -> str:
    """One line for the metrics.json of the fine-tuning or federated run that wrote an adapter."""
    parts = []
    if data := run.get("data"):
        parts.append(f"{data.get('examples')} examples ({sum((data.get('quarantined') or {}).values())} quarantined)")
    if silos := run.get("silos"):
        parts.append(
            f"{run.get('rounds')} rounds over "
            + ", ".join(f"{name} ({s.get('examples')} examples)" for name, s in silos.items())
        )
    if ev := run.get("eval"):
        base, adapter = ev.get("base", {}), ev.get("adapter", {})
        line = f"held-out loss {base.get('loss', float('nan')):.4f} -> {adapter.get('loss', float('nan')):.4f}"
        if "exact_match" in adapter:
            line += f", exact match {base.get('exact_match', 0):.1%} -> {adapter['exact_match']:.1%}"
        parts.append(line)
    return "; ".join(parts)


def _lineage_row(key: str, value: Any) -> tuple[str, str]:
    """(label, text) of one lineage entry."""
    if key == "data":
        text = value["manifest"] or "(none recorded)"
        if value["exists"]:
            facts = [
                f"{value['shards']} shards",
                f"{value['tokens']} tokens",
                value["config_hash"],
                value["tokenizer_hash"] and f"tokenizer {value['tokenizer_hash']}",
            ]
            text += f" ({', '.join(f for f in facts if f)})"
        elif value["manifest"]:
            text += " (no longer there)"
        return "from data", text
    if key == "checkpoint":
        return "from checkpoint", value["path"] + ("" if value["exists"] else " (no longer there)")
    if key == "merged":
        return "merged from", (
            f"{value['base']} + adapter {value['adapter']} ({value['adapter_sha256']}, "
            f"scaling {value['scaling']}, {value['modules']} modules)"
        )
    if key == "run":
        return "run", _run_text(value)
    if key == "tokenizer":
        return "tokenizer", f"{value['dir']} (hash {value['hash']}, vocab {value['vocab_size']})"
    if key == "sources":
        return "sources", "; ".join(
            f"{name}: {s.get('files')} files, {s.get('kept_docs')} documents kept, weight {s.get('weight')}"
            for name, s in value.items()
        )
    labels = {"tokenizer_dir": "tokenizer", "base": "from base", "config_hash": "config"}
    return labels.get(key, key), json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else str(value)


def format_text(info: dict[str, Any]) -> str:
    """The human-readable summary: one `label  value` line per fact, lineage last."""
    rows: list[tuple[str, str]] = [(info["kind"], info["path"])]
    if info.get("steps"):
        rows.append(("steps", f"{', '.join(map(str, info['steps']))} (newest: {info['newest']})"))
    if info.get("step") is not None:
        position = f" (data position {info['data_position']})" if info.get("data_position") is not None else ""
        rows.append(("step", f"{info['step']}{position}"))
    if layout := info.get("layout"):
        rows.append(("layout", f"ep={layout.get('ep')} x dp={layout.get('dp')}"))
    if info.get("rounds") is not None:
        rows.append(("rounds", str(info["rounds"])))
    if info.get("loss") is not None:
        rows.append(("loss", f"{info['loss']:.4f}"))
    if info.get("architecture"):
        rows.append(("architecture", info["architecture"]))
    if model := info.get("model"):
        rows.append(
            (
                "size",
                f"{_count(model['params'])} parameters, {_count(model['active_params'])} active "
                f"per token; dim {model['dim']}, {model['num_layers']} layers, {model['num_experts']} "
                f"experts (top-{model['top_k']}), vocab {model['vocab_size']}, context {model['max_seq_len']}",
            )
        )
    if adapter := info.get("adapter"):
        rows.append(
            ("lora", f"r={adapter['r']} alpha={adapter['lora_alpha']} on {', '.join(adapter['target_modules'] or [])}")
        )
    if run := info.get("run"):
        rows.append(("run", f"{run.get('name')} ({run.get('steps')} steps)"))
    if "splits" in info:
        for split, s in info["splits"].items():
            rows.append(
                (
                    f"{split}",
                    f"{s['shards']} shards, {s['rows']} rows of {info['seq_len']} + 1 tokens, {s['tokens']} tokens",
                )
            )
        counts = info["counts"]
        if counts.get("kept_docs") is not None:
            rows.append(("documents", f"{counts['kept_docs']} kept, {counts.get('quarantined_total', 0)} quarantined"))
    rows += [
        row
        for key, value in info.get("lineage", {}).items()
        if value not in (None, {}, "")
        for row in [_lineage_row(key, value)]
        if row[1]
    ]
    for i, (name, digest) in enumerate(info.get("files", {}).items()):
        rows.append(("files" if i == 0 else "", f"{name}  {digest or ''}".rstrip()))
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label:<{width}}  {value}" for label, value in rows)


def add_inspect_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "inspect",
        help="what a checkpoint, artifact, adapter or dataset is; its lineage",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "path",
        metavar="PATH",
        help="checkpoint root or step-* directory, artifact, adapter or ingest output directory "
        "(or the manifest inside one)",
    )
    p.add_argument("--json", action="store_true", help="print the facts as one JSON object")
    p.add_argument(
        "--verify", action="store_true", help="also re-read every file and check its checksum (reads the whole model)"
    )

    def run(args: argparse.Namespace) -> int:
        try:
            info = describe(args.path)
        except NotRecognised as exc:
            print(f"raymoe inspect: {exc}", file=sys.stderr)
            return 2
        try:
            result = verify(info) if args.verify else None
        except ValueError as exc:
            print(f"raymoe inspect: verify failed: {exc}", file=sys.stderr)
            return 1
        if args.json:
            print(json.dumps({**info, **({"verified": True} if result else {})}, indent=2, sort_keys=True))
        else:
            print(format_text(info) + (f"\n{result}" if result else ""))
        return 0

    p.set_defaults(func=run)
