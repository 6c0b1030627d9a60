"""MkDocs hook: the CLI reference (docs/cli.md), generated from verispec's parser and settings models.

On the page `cli.md` the marker `<!-- cli-reference -->` is replaced by, for each subcommand of
`verispec.cli.build_parser()`: its help line, its positional arguments, one table per settings
model recorded on the subparser (`settings_models`: a list of `(model_class, skip)`; fields in
`skip` are not flags of that command) giving flag, environment variable, config-file key, default
and description, and then the subparser's remaining argparse options. Registered in mkdocs.yml
under `hooks:`. If the parser cannot be built the build fails: a reference that silently lost
its content would be worse than none.
"""

from __future__ import annotations

import argparse
import enum
import inspect
from typing import Any

from mkdocs.exceptions import PluginError

MARKER = "<!-- cli-reference -->"
PAGE = "cli.md"
ENV_PREFIX = "VERISPEC_"  # verispec.config.Settings reads VERISPEC_<FIELD_NAME>


def on_page_markdown(markdown: str, page, config, files) -> str:
    if page.file.src_uri != PAGE:
        return markdown
    if MARKER not in markdown:
        raise PluginError(f"{PAGE} lacks the marker {MARKER} where the CLI reference goes")
    return markdown.replace(MARKER, cli_reference())


def cli_reference() -> str:
    try:
        from verispec.cli import build_parser

        parser = build_parser()
    except Exception as exc:  # an import error in the package must fail the build, with its cause
        raise PluginError(f"cannot build verispec's CLI parser for the CLI reference: {exc!r}") from exc
    subparsers = _subparsers_action(parser)
    help_lines = {action.dest: action.help for action in subparsers._choices_actions}
    out = ["| command | what it does |", "|---|---|"]
    for name in subparsers.choices:
        out.append(f"| [`verispec {name}`](#verispec-{name}) | {_cell(help_lines.get(name) or '')} |")
    out.append("")
    for name, sub in subparsers.choices.items():
        out.extend(_command(name, sub, help_lines.get(name) or sub.description or ""))
    return "\n".join(out) + "\n"


def _subparsers_action(parser: argparse.ArgumentParser) -> argparse._SubParsersAction:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    raise PluginError("verispec's parser has no subcommands")


def _command(name: str, sub: argparse.ArgumentParser, help_line: str) -> list[str]:
    from verispec.config import also_named  # importable: the parser was built

    positionals = [a for a in sub._actions if not a.option_strings and a.help != argparse.SUPPRESS]
    synopsis = " ".join(["verispec", name, "[OPTIONS]", *(_metavar(a) for a in positionals)])
    out = [f"## `verispec {name}`", "", _sentence(help_line), "", "```", synopsis, "```", ""]
    if positionals:
        out += ["**Arguments**", "", "| argument | description |", "|---|---|"]
        for action in positionals:
            out.append(f"| `{_metavar(action)}` | {_cell(_help(sub, action))} |")
        out.append("")

    from_models: set[str] = set()
    by_dest = {a.dest: a for a in sub._actions if a.option_strings}
    for model, skip in getattr(sub, "settings_models", []):
        fields = [(n, f) for n, f in model.model_fields.items() if n not in skip]
        if not fields:
            continue
        doc = inspect.getdoc(model) or ""
        title = doc.split("\n\n")[0].split(". ")[0].rstrip(".") if doc else model.__name__
        out += [
            f"**{_cell(title)}** (`{model.__name__}`)",
            "",
            "| flag | environment | config key | default | description |",
            "|---|---|---|---|---|",
        ]
        prefix = model.model_config.get("env_prefix") or ENV_PREFIX  # a BaseSettings may name its own
        for field_name, field in fields:
            from_models.add(field_name)
            flag = _settings_flag(field_name, field, by_dest.get(field_name))
            names = (*also_named(field), field_name)  # a field's other names (max_tokens) come first
            alias = getattr(field.validation_alias, "choices", None)  # a variable shared by several commands
            env = " or ".join(f"`{name.upper()}`" for name in alias or [prefix + n for n in names])
            keys = " or ".join(f"`{name}`" for name in names)
            out.append(
                f"| {flag} | {env} | {keys} | {_default(field)} | "
                f"{_cell(field.description or '')} |"
            )
        out.append("")

    others = [
        a for a in sub._actions
        if a.option_strings and a.dest not in from_models and a.help != argparse.SUPPRESS
        and not isinstance(a, argparse._HelpAction)
    ]  # fmt: skip
    if others:
        title = "Other options" if from_models else "Options"
        out += [f"**{title}**", "", "| flag | description |", "|---|---|"]
        for action in others:
            out.append(f"| {_option_flag(action)} | {_cell(_help(sub, action))} |")
        out.append("")
    return out


def _settings_flag(name: str, field, action: argparse.Action | None) -> str:
    flag = "--" + name.replace("_", "-")
    if action is not None and len(action.option_strings) > 1 and action.nargs is None:  # other names: --max-tokens
        return " / ".join(f"`{s} {action.metavar or name.upper()}`" for s in action.option_strings)
    if action is not None and isinstance(action, argparse.BooleanOptionalAction):
        return " / ".join(f"`{s}`" for s in action.option_strings)
    if field.annotation is bool and field.default is True:
        return f"`{flag}` / `--no-{flag[2:]}`"
    if action is not None and action.nargs == 0:  # store_const / store_true: a switch
        return f"`{flag}`"
    if field.annotation is bool:
        return f"`{flag}`"
    metavar = action.metavar if action is not None and action.metavar else name.upper()
    return f"`{flag} {metavar}`"


def _option_flag(action: argparse.Action) -> str:
    if action.nargs == 0:
        return " / ".join(f"`{s}`" for s in action.option_strings)
    metavar = action.metavar
    if metavar is None:
        metavar = action.dest.upper()
    elif isinstance(metavar, tuple):
        metavar = " ".join(metavar)
    return " / ".join(f"`{s} {metavar}`" for s in action.option_strings)


def _help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    """The help text as --help prints it (with %(default)s and the like filled in)."""
    if not action.help:
        return ""
    if any(word in action.dest for word in ("key", "secret", "password", "token")):
        # Never expand a default that may come from the environment (a secret) into the docs.
        return action.help.replace("%(default)s", "none")
    try:
        return parser._get_formatter()._expand_help(action)
    except (KeyError, TypeError, ValueError):
        return action.help


def _default(field) -> str:
    from pydantic_core import PydanticUndefined

    if field.default_factory is not None:
        return "computed"
    value: Any = field.default
    if value is PydanticUndefined:
        return "required"
    if value is None or value == ():
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, enum.Enum):
        value = value.value
    if hasattr(value, "get_secret_value"):
        return "(secret)"
    return f"`{value}`"


def _metavar(action: argparse.Action) -> str:
    name = action.metavar or action.dest.upper()
    if action.nargs in ("*", "?"):
        return f"[{name}]"
    if action.nargs == "+":
        return f"{name} [{name} ...]"
    return name


def _sentence(text: str) -> str:
    text = text.strip()
    if not text:
        return ""
    text = text[0].upper() + text[1:]
    return text if text.endswith((".", "!", "?")) else text + "."


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return " ".join(str(text).split()).replace("|", "\\|").replace("<", "&lt;")
