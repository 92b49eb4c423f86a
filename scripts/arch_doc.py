"""Regenerate the generated sections of ``docs/ARCHITECTURE.md`` from the code they describe.

- ``nats-layout``: the subject table of ``duanflow_proto/subjects.py``, the streams of ``duanflow_kit.streams``, the
  KV buckets and the control-API subjects;
- ``nats-roles``: the per-role NATS permissions of ``duanflow._local.natsconf`` (the local stack and, through
  ``docker/nats/nats.conf``, docker-compose).

Each section sits between ``<!-- BEGIN GENERATED: name -->`` and ``<!-- END GENERATED: name -->``; the prose around
them is written by hand. ``make docs`` rewrites them; ``make lint`` and ``tests/unit/test_schemas.py`` fail when the
committed page differs.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from duanflow._local.natsconf import ROLE_PERMISSIONS, ROLE_PUBLISH_DENY
from duanflow_kit.streams import KV_TTLS, stream_configs
from duanflow_proto import subjects

ROOT = Path(__file__).resolve().parent.parent
DOC_PATH = ROOT / "docs" / "ARCHITECTURE.md"
SECTION = re.compile(
    r"(<!-- BEGIN GENERATED: (?P<name>[a-z-]+) -->\n)(?P<body>.*?)(<!-- END GENERATED: (?P=name) -->)", re.S
)


def _enum(value: object) -> str:
    return str(getattr(value, "value", value))


def _duration(seconds: float | None) -> str:
    if not seconds:
        return "—"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def _size(n: int | None) -> str:
    if not n or n < 0:
        return "—"
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size} {unit}"
    return f"{n} B"


def nats_layout() -> str:
    """Subjects, streams, KV buckets and control subjects, as Markdown."""
    doc = subjects.__doc__ or ""
    table = [line for line in doc.splitlines() if line.startswith("|")]
    out = ["Subjects (from `duanflow_proto/subjects.py`, which builds every one of them):", "", *table, ""]
    out += [
        "Streams (from `duanflow_kit.streams`, created idempotently by whichever service starts first; "
        "`replicas` is 1 on the local stack):",
        "",
        "| stream | subjects | retention | max age | max bytes | max message |",
        "|---|---|---|---|---|---|",
    ]
    for cfg in stream_configs():
        out.append(
            f"| `{cfg.name}` | {', '.join(f'`{s}`' for s in cfg.subjects or [])} | {_enum(cfg.retention)} "
            f"| {_duration(cfg.max_age)} | {_size(cfg.max_bytes)} | {_size(cfg.max_msg_size)} |"
        )
    out += ["", "KV buckets:", "", "| bucket | TTL |", "|---|---|"]
    out += [f"| `{bucket}` | {_duration(ttl)} |" for bucket, ttl in KV_TTLS.items()]
    control = sorted(
        (name, value)
        for name, value in vars(subjects).items()
        if (name.startswith("API_") or name == "BUILD_START") and isinstance(value, str) and name != "API_ALL"
    )
    out += ["", "Control request/reply subjects (core NATS, never captured by a stream):", ""]
    out += ["| constant | subject |", "|---|---|"]
    out += [f"| `subjects.{name}` | `{value}` |" for name, value in control]
    out += [
        "",
        f"Per-function durable consumers are named by `subjects.consumer_name(env, app, fn)` "
        f"(e.g. `{subjects.consumer_name('main', 'hello-gpu', 'classify_ticket')}`).",
    ]
    return "\n".join(out) + "\n"


def nats_roles() -> str:
    """The NATS users and what each may publish and subscribe to, as Markdown."""
    out = ["| role | may publish | may not publish | may subscribe |", "|---|---|---|---|"]
    for role in sorted(ROLE_PERMISSIONS):
        perms = ROLE_PERMISSIONS[role]
        pub = ", ".join(f"`{s}`" for s in perms["publish"])
        sub = ", ".join(f"`{s}`" for s in perms["subscribe"])
        deny = ", ".join(f"`{s}`" for s in ROLE_PUBLISH_DENY.get(role, [])) or "—"
        out.append(f"| `{role}` | {pub} | {deny} | {sub} |")
    out += ["", "Every role may also answer the requests it receives (`allow_responses`)."]
    return "\n".join(out) + "\n"


GENERATORS = {"nats-layout": nats_layout, "nats-roles": nats_roles}


def render(text: str) -> str:
    """``text`` with every generated section replaced by what the code says today."""
    seen: set[str] = set()

    def replace(match: re.Match[str]) -> str:
        name = match["name"]
        if name not in GENERATORS:
            raise SystemExit(f"{DOC_PATH}: unknown generated section {name!r}")
        seen.add(name)
        return match.group(1) + GENERATORS[name]() + match.group(4)

    result = SECTION.sub(replace, text)
    missing = sorted(set(GENERATORS) - seen)
    if missing:
        raise SystemExit(f"{DOC_PATH} lacks the generated sections {missing}")
    return result


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python scripts/arch_doc.py [--check]``."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="exit 1 when the committed page is stale")
    args = parser.parse_args(argv)
    text = DOC_PATH.read_text(encoding="utf-8")
    new = render(text)
    if args.check:
        if new != text:
            print(f"{DOC_PATH} is stale: run `make docs`", file=sys.stderr)
            return 1
        return 0
    if new != text:
        DOC_PATH.write_text(new, encoding="utf-8")
        print(f"wrote {DOC_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
