"""The event catalogue as Markdown, generated from ``schemas/`` and ``infra/topics.toml``:
per event type its context, topic(s), key and fields (type and doc). ``python -m infra.clidoc``
writes it into README.md between ``<!-- events:start -->`` and ``<!-- events:end -->``."""

from __future__ import annotations

from typing import Any

from events.catalog import load_catalogue
from events.schemas import load_schemas


def _type_name(avro_type: Any) -> str:
    if isinstance(avro_type, list):
        names = [_type_name(t) for t in avro_type]
        if "null" in names and len(names) == 2:
            return f"{next(n for n in names if n != 'null')}?"
        return " | ".join(names)
    if isinstance(avro_type, dict):
        if "logicalType" in avro_type:
            return f"{avro_type['logicalType']}"
        if avro_type.get("type") in {"array", "map"}:
            inner = avro_type.get("items", avro_type.get("values"))
            return f"{avro_type['type']}<{_type_name(inner)}>"
        return str(avro_type.get("name", avro_type.get("type")))
    return str(avro_type)


def render_events_markdown() -> str:
    """Markdown: one section per event type with a field table."""
    topics = load_catalogue()
    by_type: dict[str, list[str]] = {}
    keys: dict[str, str] = {}
    for spec in topics.values():
        for event_type in spec.event_types:
            by_type.setdefault(event_type, []).append(spec.name)
            keys[event_type] = spec.key
    parts: list[str] = []
    for full_name, schema in sorted(load_schemas().items(), key=lambda kv: (kv[1].context, kv[0])):
        where = ", ".join(f"`{t}`" for t in by_type.get(full_name, [])) or "(no topic yet)"
        parts.append(f"#### `{full_name}` ({schema.context})")
        parts.append("")
        parts.append(f"{schema.raw.get('doc', '')}  ")
        parts.append(f"Topic: {where}; key: `{keys.get(full_name, '-')}`; schema: `{schema.path.name}`.")
        parts.append("")
        parts.append("| field | type | meaning |")
        parts.append("|---|---|---|")
        for field in schema.raw["fields"]:
            doc = str(field.get("doc", "")).replace("|", "\\|")
            parts.append(f"| `{field['name']}` | {_type_name(field['type'])} | {doc} |")
        parts.append("")
    return "\n".join(parts).rstrip() + "\n"
