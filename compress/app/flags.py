"""Command-line flags derived from the settings models, both ways: a parser's flags from a
model's fields (type, choices, default, help), and the `chansearch` command line that
reproduces a given settings object (what a run report prints)."""
from __future__ import annotations

import argparse
import re
import shlex
import types
import typing
from typing import Literal

from pydantic import BaseModel, ValidationError

from compress.errors import CompressError


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _scalar(annotation):
    """(python type, choices) of a field's annotation; None for lists and nested models."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return _scalar(inner[0]) if len(inner) == 1 else (None, None)
    if typing.get_origin(annotation) is Literal:
        return type(args[0]), list(args)
    if annotation in (int, float, str, bool):
        return annotation, None
    return None, None


def add_flags(parser, model: type[BaseModel], skip: tuple[str, ...] = (), title: str | None = None) -> None:
    """One flag per scalar field of `model` (lists and nested models are the command's own
    business); booleans get --x / --no-x."""
    target = parser.add_argument_group(title) if title else parser
    for name, field in model.model_fields.items():
        if name in skip:
            continue
        kind, choices = _scalar(field.annotation)
        if kind is None:
            continue
        options = {"dest": name, "default": field.default, "help": field.description or ""}
        if kind is bool:
            target.add_argument(flag(name), action=argparse.BooleanOptionalAction, **options)
        else:
            extra = field.json_schema_extra or {}
            metavar = extra.get("metavar") or (None if choices else {int: "N", float: "X"}.get(kind, name.upper()))
            target.add_argument(flag(name), type=kind, choices=choices, metavar=metavar, **options)


def settings_from(model: type[BaseModel], args: argparse.Namespace, **values):
    """`model` from the parsed flags (fields the command does not take keep their
    defaults) plus `values`; a value out of range is a CompressError naming its flag."""
    given = {n: getattr(args, n) for n in model.model_fields if hasattr(args, n)}
    try:
        return model(**{**given, **values})
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            name = str(err["loc"][0]) if err["loc"] else ""
            value = f" {err['input']!r}" if "input" in err and err["type"] != "value_error" else ""
            where = f"{flag(name) if name in given else name}{value}: " if name else ""
            problems.append(where + err["msg"].removeprefix("Value error, "))
        raise CompressError("; ".join(problems) + ".") from None


def command_line(command: str, positionals: list, settings: list[BaseModel], extra: list | None = None) -> str:
    """The `chansearch` command that runs `command` with exactly these settings: every value
    that differs from its default, as its flag (required fields, like a data spec, are the
    command's positionals or `extra`)."""
    argv = [command, *map(str, positionals)]
    for s in settings:
        for name, field in type(s).model_fields.items():
            kind, _ = _scalar(field.annotation)
            value = getattr(s, name)
            if kind is None or field.is_required() or value == field.default:
                continue
            if kind is bool:
                argv.append(flag(name) if value else "--no-" + name.replace("_", "-"))
            else:
                argv += [flag(name), str(value)]
    return "chansearch " + shlex.join(argv + [str(a) for a in extra or []])


def word_for_cli(message: str, known: set[str]) -> str:
    """Library errors name settings as `name`; the CLI says the flag (for the names in `known`,
    its parsed arguments)."""
    return re.sub(r"`([a-z_][a-z0-9_]*)`", lambda m: flag(m.group(1)) if m.group(1) in known else m.group(0), message)
