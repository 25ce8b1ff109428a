"""Command-line flags generated from typed config dataclasses: one flag per field.

Main API: :class:`FlagConfig` (mixin of a config dataclass: ``add_args(parser)``,
``from_args(namespace)``), :func:`add_config_args` (an argparse group for a dataclass),
:func:`config_from_args` (the dataclass back from the parsed namespace) and
:func:`field_docs` (the docstring under each field, used as the flag's help).

Field ``foo_bar`` becomes flag ``--foo-bar``; the type comes from the annotation (``bool``
fields are ``store_true`` switches, ``Optional[X]`` takes an ``X``, ``List[X]`` takes one
or more), the default from the field. ``field(metadata={"argparse": {...}})`` adds or
overrides argparse keywords (``choices``, ``nargs``, ``metavar``, and ``aliases``: more
spellings of the same flag). Because flags are
generated from fields, the two cannot drift apart, and the docstring a reader sees in the
dataclass is the text ``--help`` prints.

Pure Python (argparse, ast, dataclasses, typing): the feature packages that must not import
torch use it too.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import re
import textwrap
import typing
from typing import Any, ClassVar, Dict, Iterable, Type

__all__ = ["FlagConfig", "add_config_args", "config_from_args", "field_docs", "flag_name",
           "require"]


def require(cond: bool, message: str) -> None:
    """Raise ``ValueError(message)`` unless ``cond``: one line that names the flag and the fix."""
    if not cond:
        raise ValueError(message)


def flag_name(field_name: str) -> str:
    """``foo_bar`` -> ``--foo-bar``."""
    return "--" + field_name.replace("_", "-")


@functools.lru_cache(maxsize=None)
def field_docs(cls: type) -> Dict[str, str]:
    """{field name: the string literal right below it in the class body}."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # no source (e.g. frozen): flags simply get no help
        return {}
    body = ast.parse(source).body[0].body
    docs: Dict[str, str] = {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)):
            docs[node.target.id] = inspect.cleandoc(nxt.value.value)
    return docs


# A sentence ends at ". " before a capital, but not after "et al", "e.g", "i.e".
_SENTENCE_END = re.compile(r"(?<!\bal)(?<!e\.g)(?<!i\.e)\.\s+(?=[A-Z`])")


def _help(doc: str) -> str:
    """The doc's first sentence, %-escaped for argparse."""
    first = _SENTENCE_END.split(" ".join(doc.split()))[0].rstrip(".")
    return first.replace("%", "%%")


def _argparse_kwargs(f: dataclasses.Field, hint: Any) -> Dict[str, Any]:
    default = f.default if f.default is not dataclasses.MISSING else (
        f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
    kw: Dict[str, Any] = {"default": default}
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union and type(None) in args:  # Optional[X]
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is bool:
        if default:
            raise TypeError(f"bool field {f.name} must default to False to be a switch")
        kw["action"] = "store_true"
    elif origin in (list, typing.List):
        kw.update(nargs="+", type=args[0] if args else str)
    elif hint in (int, float, str):
        kw["type"] = hint
    else:
        raise TypeError(f"field {f.name}: no flag type for {hint!r}")
    return kw


def add_config_args(parser: argparse.ArgumentParser, cls: Type, title: str,
                    skip: Iterable[str] = ()) -> argparse._ArgumentGroup:
    """Add one argparse group with a flag per init field of the dataclass ``cls``.

    Flags named in ``skip`` (field names) are left out, e.g. when another group of the
    same parser already defines them with the same meaning.
    """
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    description = (inspect.getdoc(cls) or "").split("\n")[0] or None
    group = parser.add_argument_group(title, description)
    for f in dataclasses.fields(cls):
        if not f.init or f.name in set(skip):
            continue
        kw = _argparse_kwargs(f, hints[f.name])
        kw["help"] = _help(docs.get(f.name, ""))
        kw.update(f.metadata.get("argparse", {}))
        aliases = kw.pop("aliases", [])  # e.g. Megatron-LM's own spelling of the flag
        if kw.get("action") == "store_true":
            kw.pop("type", None)
        group.add_argument(flag_name(f.name), *aliases, dest=f.name, **kw)
    return group


def config_from_args(cls: Type, namespace: argparse.Namespace):
    """``cls(**{field: namespace.field})`` for the init fields the namespace has; the
    dataclass's ``__post_init__`` checks run (and raise ``ValueError`` on bad values)."""
    kw = {f.name: getattr(namespace, f.name) for f in dataclasses.fields(cls)
          if f.init and hasattr(namespace, f.name)}
    return cls(**kw)


class FlagConfig:
    """Mixin of a config dataclass whose fields are flags (``flag_group``: the --help title)."""

    flag_group: ClassVar[str] = "options"

    @classmethod
    def add_args(cls, parser: argparse.ArgumentParser,
                 skip: Iterable[str] = ()) -> argparse.ArgumentParser:
        """Add this config's argparse group (a flag per field) to ``parser``."""
        add_config_args(parser, cls, cls.flag_group, skip)
        return parser

    @classmethod
    def from_args(cls, namespace: argparse.Namespace):
        """The config from a namespace parsed with :meth:`add_args`."""
        return config_from_args(cls, namespace)
