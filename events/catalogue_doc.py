"""The event catalogue as Markdown, generated from ``schemas/`` and ``infra/topics.toml``.

:func:`render_events_markdown` is the page ``docs/events.md`` of the docs site: a summary table
(context | event | topic | key), then one heading per bounded context and, under it, per event
type its doc, topic(s), key and a field table (type and meaning; nested record fields as
``lines[].sku``, enum symbols spelled out). ``python -m infra.clidoc`` writes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from events.catalog import load_catalogue
from events.schemas import EventSchema, load_schemas

#: One line per bounded context, shown under its heading (contexts not listed get none).
CONTEXT_DOCS: dict[str, str] = {
    "playback": "What listeners do in the player, stream delivery, and publication to the CDN.",
    "listening": "Facts derived from listens by the stream processors (sessions).",
    "catalog": "The catalog and what users keep of it: tracks, albums, licences, libraries, playlists.",
    "personalisation": "Features, recommendations and experiment assignments.",
    "billing": "Subscriptions, payments, the ledger, and the commands the sagas send the payment gateway.",
    "orders": "The shop: orders, inventory, and the commands the order saga sends the inventory service.",
    "ads": "Ad delivery, clicks, campaign budgets and reports.",
    "platform": "Users, entitlements (and their commands), the audit trail, notifications.",
    "media": "Uploads, transcoding and audio analysis.",
}


@dataclass(frozen=True)
class _Row:
    name: str
    type: str
    doc: str


def _enum_note(avro_type: dict[str, Any]) -> str:
    symbols = ", ".join(f"`{s}`" for s in avro_type.get("symbols", []))
    default = f" (default `{avro_type['default']}`)" if "default" in avro_type else ""
    return f"One of {symbols}{default}."


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
        if avro_type.get("type") == "enum":
            return f"enum {avro_type['name']}"
        return str(avro_type.get("name", avro_type.get("type")))
    return str(avro_type)


def _named_inside(avro_type: Any) -> tuple[str, dict[str, Any]] | None:
    """The enum or record inside ``avro_type`` (through unions, arrays and maps) with the path
    suffix that reaches it (``[]`` for array items, ``{}`` for map values)."""
    if isinstance(avro_type, list):
        for branch in avro_type:
            found = _named_inside(branch)
            if found:
                return found
        return None
    if isinstance(avro_type, dict):
        kind = avro_type.get("type")
        if kind in {"enum", "record"}:
            return "", avro_type
        if kind == "array":
            found = _named_inside(avro_type["items"])
            return (f"[]{found[0]}", found[1]) if found else None
        if kind == "map":
            found = _named_inside(avro_type["values"])
            return (f"{{}}{found[0]}", found[1]) if found else None
    return None


def _rows(fields: list[dict[str, Any]], prefix: str = "") -> list[_Row]:
    out: list[_Row] = []
    for field in fields:
        name = f"{prefix}{field['name']}"
        doc = str(field.get("doc", ""))
        named = _named_inside(field["type"])
        if named and named[1]["type"] == "enum":
            doc = f"{doc} {_enum_note(named[1])}".strip()
        out.append(_Row(name, _type_name(field["type"]), doc))
        if named and named[1]["type"] == "record":
            out.extend(_rows(named[1]["fields"], f"{name}{named[0]}."))
    return out


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _topics_by_type() -> dict[str, list[tuple[str, str]]]:
    """Event type full name → [(topic, key), …] in catalogue order."""
    by_type: dict[str, list[tuple[str, str]]] = {}
    for spec in load_catalogue().values():
        for event_type in spec.event_types:
            by_type.setdefault(event_type, []).append((spec.name, spec.key))
    return by_type


def _by_context() -> dict[str, list[EventSchema]]:
    grouped: dict[str, list[EventSchema]] = {}
    for schema in sorted(load_schemas().values(), key=lambda s: (s.context, s.name)):
        grouped.setdefault(schema.context, []).append(schema)
    return grouped


def _where(places: list[tuple[str, str]]) -> tuple[str, str]:
    topics = ", ".join(f"`{t}`" for t, _ in places) or "(no topic yet)"
    keys = ", ".join(dict.fromkeys(f"`{k}`" for _, k in places)) or "-"
    return topics, keys


def _summary_table() -> list[str]:
    by_type = _topics_by_type()
    lines = ["| context | event | topic | key |", "|---|---|---|---|"]
    for context, schemas in _by_context().items():
        for schema in schemas:
            topics, keys = _where(by_type.get(schema.full_name, []))
            lines.append(f"| {context} | `{schema.full_name}` | {topics} | {keys} |")
    return lines


def render_events_markdown() -> str:
    """The full catalogue page: a summary table, then per context and event type the doc, the
    topic(s), the key and a field table."""
    by_type = _topics_by_type()
    grouped = _by_context()
    parts = [
        "# Event catalogue",
        "",
        "<!-- Generated by `python -m infra.clidoc` from schemas/ and infra/topics.toml: do not edit. -->",
        "",
        "Every event type backbeat knows, grouped by bounded context (the folder under `schemas/`). "
        "Values are Avro in the Confluent wire format; the key is the entity id as UTF-8; times are "
        "`timestamp-millis` (UTC); money is an integer `*_minor` amount plus an ISO 4217 `currency`. "
        "Commands (imperative names, on `*.commands` topics) carry an `idempotency_key` and a "
        '`correlation_id`. A `?` after a type means optional (`["null", T]`, default null).',
        "",
        f"{len(load_schemas())} event types in {len(grouped)} contexts.",
        "",
        "## Summary",
        "",
        *_summary_table(),
        "",
    ]
    for context, schemas in grouped.items():
        parts.append(f"## {context}")
        parts.append("")
        if CONTEXT_DOCS.get(context):
            parts.append(CONTEXT_DOCS[context])
            parts.append("")
        for schema in schemas:
            topics, keys = _where(by_type.get(schema.full_name, []))
            parts.append(f"### `{schema.full_name}`")
            parts.append("")
            parts.append(f"{schema.raw.get('doc', '')}  ")
            parts.append(f"Topic: {topics}; key: {keys}; schema: `schemas/{context}/{schema.path.name}`.")
            parts.append("")
            parts.append("| field | type | meaning |")
            parts.append("|---|---|---|")
            for row in _rows(schema.raw["fields"]):
                parts.append(f"| `{row.name}` | `{_cell(row.type)}` | {_cell(row.doc)} |")
            parts.append("")
    return "\n".join(parts).rstrip() + "\n"
