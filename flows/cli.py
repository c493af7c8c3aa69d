"""Command lines of the flows, generated from their parameter models (``flows/params.py``).

Every ``python flows/<name>.py`` builds its options with pydantic-settings' ``CliApp`` /
``CliSettingsSource`` from the flow's pydantic model: one ``--field-name`` option per field
(kebab case, plus the short names in ``shortcuts``, e.g. ``--tables`` for
``--tables-dir``), the field's description as help, ``choices`` for literal fields (the
encoder options of a modality offer only that modality's presets), JSON for dict and list
fields. Errors are one line, argparse style, with exit status 2 (:class:`OneLineParser`):

* a value the model refuses (``--items-per-shard 0``) names the flag and the rule:
  ``cache_hidden_states.py: error: argument --items-per-shard: Input should be greater than
  or equal to 1 (got '0')``;
* a store given for the wrong slot (an image store as ``--text-store``) names the store and
  the modality it holds (:func:`check_stores`, ``pipeline.cached_inputs``);
* unknown options and bad choices are argparse's own one-line errors.

Sources: pydantic-settings ``CliApp`` (https://docs.pydantic.dev/latest/concepts/pydantic_settings/#command-line-support);
argparse's error convention (``prog: error: ...``, exit 2).
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import Any, Mapping, NoReturn, TypeVar

from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are a single ``prog: error: message`` line (exit 2)."""

    def error(self, message: str) -> NoReturn:  # noqa: D401 - argparse's hook
        """Print ``<prog>: error: <message>`` (one line) to stderr and exit with status 2."""
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())}\n")


def flag(field: str) -> str:
    """The command-line flag of a model field: ``items_per_shard`` -> ``--items-per-shard``."""
    return "--" + field.replace("_", "-")


def validation_message(exc: ValidationError, fields: Any = ()) -> str:
    """One line for the first error of ``exc``: ``argument --flag: reason (got 'value')``.

    A model-level rule whose message starts with one of ``fields`` (``runner.kind: ...``,
    raised by ``flows.params`` for a nested model) names that field's flag; other
    model-level rules give their reason only.
    """
    err = exc.errors()[0]
    loc = err.get("loc") or ()
    msg = str(err.get("msg", exc)).removeprefix("Value error, ")
    if loc and isinstance(loc[0], str):
        got = err.get("input")
        shown = f" (got {got!r})" if isinstance(got, (str, int, float)) else ""
        return f"argument {flag(loc[0])}: {msg}{shown}"
    head = msg.split(":", 1)[0].split(".", 1)[0]
    if head in fields:
        return f"argument {flag(head)}: {msg}"
    return msg


class ModelCli:
    """The command line of one parameter model.

    Args:
        model: the flow's pydantic parameter model (``flows.params``).
        prog: program name shown in usage and errors (e.g. ``flows/train.py``).
        description: text above the options (default: the model's docstring).
        shortcuts: extra flags per field, without dashes: ``{"tables_dir": "tables"}``.
        epilog: text below the options.
    """

    def __init__(self, model: type[M], prog: str, description: str | None = None,
                 shortcuts: Mapping[str, str | list[str]] | None = None,
                 epilog: str | None = None) -> None:
        self.model = model
        self.parser = OneLineParser(prog=prog, description=description or model.__doc__,
                                    epilog=epilog,
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
        from pydantic_settings import CliSettingsSource
        # the source adds one option per field to the parser now (so help() works at once)
        self.source = CliSettingsSource(
            model, cli_prog_name=prog, root_parser=self.parser, cli_kebab_case=True,
            cli_shortcuts={k.replace("_", "-"): v for k, v in (shortcuts or {}).items()},
            cli_hide_none_type=True, cli_implicit_flags=True, cli_exit_on_error=True)

    def parse(self, argv: list[str] | None = None) -> M:
        """Parse ``argv`` (default ``sys.argv[1:]``) into the model.

        Raises:
            SystemExit: status 2 after one ``error:`` line on stderr (a bad value, an unknown
                option), status 0 after ``--help``.
        """
        from pydantic_settings import CliApp, SettingsError
        argv = sys.argv[1:] if argv is None else list(argv)
        try:
            return CliApp.run(self.model, cli_args=argv, cli_settings_source=self.source)
        except ValidationError as exc:
            self.parser.error(validation_message(exc, self.model.model_fields))
        except SettingsError as exc:  # a value that is not JSON / a list, before validation
            m = re.match(r"Parsing error encountered for (\w+): (.*)", str(exc), re.S)
            if m and m.group(1) in self.model.model_fields:
                self.error(f"not valid JSON: {m.group(2)}", m.group(1))
            self.parser.error(str(exc))

    def error(self, message: str, field: str | None = None) -> NoReturn:
        """Exit 2 with one ``error:`` line (naming ``field``'s flag when given)."""
        self.parser.error(f"argument {flag(field)}: {message}" if field else message)

    def help(self) -> str:
        """The ``--help`` text."""
        return self.parser.format_help()


def check_stores(cli: ModelCli, params: BaseModel,
                 slots: Mapping[str, str]) -> None:
    """Refuse, before any flow starts, a store given for the wrong modality.

    ``slots`` maps a field holding a store path to the modality it must hold
    (``{"text_store": "text", "image_store": "image"}``). A store that does not exist or
    holds another modality ends the command line with one ``error:`` line naming the flag,
    the store and the modality it holds (exit 2).
    """
    from pipeline.cached_inputs import check_store_modality
    from pipeline.errors import StoreError
    for field, slot in slots.items():
        path = getattr(params, field, None)
        if not path:
            continue
        try:
            check_store_modality(path, slot)
        except StoreError as exc:
            found = getattr(exc, "found", None)
            if found is not None:
                cli.error(f"store {path} holds {found!r} hidden states, not {slot!r}", field)
            cli.error(str(exc), field)


def summary_line(res: Mapping[str, Any], keys: tuple[str, ...]) -> str:
    """``key value`` pairs of ``res`` in ``keys`` order (missing keys skipped), one line."""
    return "  ".join(f"{k} {res[k]}" for k in keys if k in res and res[k] is not None)


__all__ = ["OneLineParser", "ModelCli", "check_stores", "flag", "validation_message",
           "summary_line"]
