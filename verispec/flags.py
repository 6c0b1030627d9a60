"""The command-line flags every command builds from its settings models, and the settings a
command reads back from its parsed flags. The commands import this module; the root CLI
(`cli.py`) imports the commands only to register them."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, get_origin

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from verispec.config import Loaded, SamplingParams, Settings, also_named, load_settings


def add_settings_flags(
    parser: argparse.ArgumentParser,
    model: type[BaseModel],
    skip: tuple[str, ...] = (),
    group: argparse._ArgumentGroup | None = None,
    aliases: dict[str, tuple[str, ...]] | None = None,
) -> None:
    """One flag per field of a settings model, its help the field's description. The parser keeps
    (model, skip) in `settings_models`, from which the docs' CLI reference is generated.

    `group`: an argument group of `parser` that lists these flags in --help; `aliases`: more option
    strings for a field's flag, put first (`check`'s `--depth` for its field `depths`). A field's
    other names (`config.AlsoNamed`) are flags of it too, before its own."""
    if not hasattr(parser, "settings_models"):
        parser.settings_models = []
    parser.settings_models.append((model, skip))
    for name, field in model.model_fields.items():
        if name in skip:
            continue
        # A default made at run time (default_factory) is described by the field's own help text;
        # a switch that is off says nothing.
        default = None if field.default in (None, (), PydanticUndefined) or field.default is False else field.default
        if isinstance(default, tuple):
            default = ",".join(map(str, default))
        help_text = (field.description or "") + (f" (default: {default})" if default is not None else "")
        kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": help_text.replace("%", "%%")}
        if field.is_required():  # no default: the flag must be given (distill --target, batch --output)
            kwargs["required"] = True
        if get_origin(field.annotation) is tuple:  # repeatable: --stop A --stop B
            free_text = field.annotation == tuple[str, ...] and not field.default  # --stop TEXT; --proposers PROPOSERS
            kwargs.update(action="append", metavar="TEXT" if free_text else name.upper())
        elif field.annotation is bool and field.default:  # on by default: --name / --no-name
            kwargs.update(action=argparse.BooleanOptionalAction)
        elif field.annotation is bool:
            kwargs.update(action="store_const", const=True)
        else:
            kwargs.update(metavar=(*also_named(field), name)[0].upper())
        flags = [*(aliases or {}).get(name, ()), *flag_names(name, field)]
        (group or parser).add_argument(*flags, **kwargs)


def flag_names(name: str, field) -> list[str]:
    """A settings field's flags: its other names' (`config.AlsoNamed`), then its own."""
    return ["--" + n.replace("_", "-") for n in (*also_named(field), name)]


def add_max_new_tokens_flag(parser: argparse.ArgumentParser) -> None:
    """--max-tokens for commands that take OpenAI requests (serve, batch): the budget of a request naming none."""
    field = SamplingParams.model_fields["max_new_tokens"]
    parser.add_argument(
        *flag_names("max_new_tokens", field), dest="max_new_tokens", type=int, default=argparse.SUPPRESS, metavar="N",
        help=f"max_tokens for requests that send none (default: {field.default})",
    )


def add_common_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", type=Path, default=None, help="TOML, YAML or JSON file of settings (flags and VERISPEC_* env vars override it)"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")


def settings_from(args: argparse.Namespace, cls: type[Loaded] = Settings) -> Loaded:
    """The command's settings from its parsed flags (given ones only), `--config` and the environment."""
    flags = {name: value for name, value in vars(args).items() if name in cls.model_fields}
    return load_settings(flags, getattr(args, "config", None), cls)


def quiet_libraries() -> None:
    """Silence the model libraries' logging and progress bars (commands that load models call it)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
