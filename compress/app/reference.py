"""The reference pages that cannot go stale: docs/cli.md from the parser (every command's help)
and docs/recipe.md from the settings models (every recipe key, its type, default and
description). `python -m compress.app.reference` writes both; a test fails when the files in
docs/ differ from what the code generates."""
from __future__ import annotations

import argparse
import os
import sys
import typing
from pathlib import Path

from pydantic import BaseModel

from compress.app.cli import build_parser
from compress.app.recipe import Recipe
from compress.settings import Target

DOCS = Path(__file__).resolve().parents[2] / "docs"
WIDTH = "100"  # the help's line width, fixed so the page does not depend on the terminal


def cli_reference() -> str:
    before = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = WIDTH
    try:
        parser = build_parser()
        commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
        parts = ["# `chansearch` command reference", "",
                 "Generated from the parser by `python -m compress.app.reference`; do not edit.", "",
                 "```", parser.format_help().rstrip(), "```"]
        for name, sub in commands.items():
            parts += ["", f"## `chansearch {name}`", "", "```", sub.format_help().rstrip(), "```"]
    finally:
        if before is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = before
    return "\n".join(parts) + "\n"


def recipe_reference() -> str:
    parts = ["# Recipe keys", "",
             "Generated from the settings models by `python -m compress.app.reference`; do not edit. Each section "
             "of a recipe is the settings model its stage takes; `chansearch run RECIPE --print-config` shows a "
             "recipe with every default.", ""]
    parts += _section("(top level)", Recipe, "")
    parts += _section("A target (each item of `prune.targets` and `search.targets`)", Target, "")
    return "\n".join(parts).rstrip() + "\n"


def _section(title: str, model: type[BaseModel], prefix: str) -> list[str]:
    rows, nested = [], []
    for name, field in model.model_fields.items():
        inner = _model_of(field.annotation)
        if inner is not None:
            nested.append((f"{prefix}{name}", inner))
            continue
        default = "required" if field.is_required() else f"`{field.default!r}`"
        kind = _type_name(field.annotation).replace("|", "\\|")
        rows.append(f"| `{prefix}{name}` | {kind} | {default} | {field.description or ''} |")
    parts = [f"## {title}", "", "| key | type | default | description |", "|---|---|---|---|", *rows, ""] if rows else []
    for key, inner in nested:
        parts += _section(f"`{key}`", inner, f"{key}.")
    return parts


def _model_of(annotation) -> type[BaseModel] | None:
    """The settings model a field holds (a section), or None for a plain value."""
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel) and typing.get_origin(annotation) is not list:
            return candidate
    return None


def _type_name(annotation) -> str:
    text = getattr(annotation, "__name__", None) if not typing.get_args(annotation) else None
    return text or str(annotation).replace("typing.", "").replace("compress.settings.", "")


def main() -> int:
    DOCS.mkdir(exist_ok=True)
    for name, text in (("cli.md", cli_reference()), ("recipe.md", recipe_reference())):
        (DOCS / name).write_text(text)
        print(f"wrote {DOCS / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
