"""Reading a YAML file that must be a mapping (recipes, experiments), with one-line errors.

PyYAML keeps the last of two equal keys without a word; here a repeated key is refused, so a
variant or an option written twice is never silently dropped.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import yaml

from imgcls.errors import UserError

MERGE_TAG = "tag:yaml.org,2002:merge"


class _DuplicateKey(Exception):
    def __init__(self, key, line: int, first: int):
        super().__init__(key)
        self.key, self.line, self.first = key, line, first


class _StrictLoader(yaml.SafeLoader):
    """safe_load, but a mapping may not give the same key twice (`<<` merges may still be overridden)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == MERGE_TAG:
                    continue
                key = self.construct_object(key_node, deep=True)
                try:  # by node, not by line: `{lr: 0.5, lr: 0.001}` gives both on one line
                    first = seen.setdefault(key, key_node)
                except TypeError:  # an unhashable key; PyYAML's own error says so below
                    continue
                if first is not key_node:
                    raise _DuplicateKey(key, key_node.start_mark.line + 1, first.start_mark.line + 1)
        return super().construct_mapping(node, deep)


# Numbers as YAML 1.2 and the command line read them: PyYAML's YAML 1.1 rules read `010` as 8 (octal), `1:00`
# as 60 (base 60) and `0x2` as 2, where `--seed 010` is 10 and `--lr 0x2` is refused. Decimal only here; the
# other forms stay text, which the option schema then refuses in one line.
# Booleans likewise: YAML 1.1 reads `prefetch: off` and `aug: no` as false; only true and false are booleans here.
# Dates likewise stay text: `lr: 2019-01-01` is refused as text, not shown as datetime.date(2019, 1, 1).
INT_TAG, FLOAT_TAG, BOOL_TAG = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float", "tag:yaml.org,2002:bool"
TIMESTAMP_TAG = "tag:yaml.org,2002:timestamp"
_StrictLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in (INT_TAG, FLOAT_TAG, BOOL_TAG, TIMESTAMP_TAG)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_StrictLoader.add_implicit_resolver(BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
INT_FORM = re.compile(r"^[-+]?[0-9]+$")
FLOAT_FORM = re.compile(r"^(?:[-+]?(?:[0-9]+\.[0-9]*|\.[0-9]+|[0-9]+)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)"
                        r"|\.(?:nan|NaN|NAN))$")
_StrictLoader.add_implicit_resolver(INT_TAG, INT_FORM, list("-+0123456789"))
_StrictLoader.add_implicit_resolver(FLOAT_TAG, FLOAT_FORM, list("-+0123456789."))


def _number(form: re.Pattern, kind: str, convert):
    """A constructor that reads only the decimal form, also under an explicit `!!int`/`!!float` tag (whose own
    constructors take `1_0`, `0x1`)."""
    def construct(loader, node):
        text = loader.construct_scalar(node)
        if not form.match(text):
            raise yaml.constructor.ConstructorError(None, None, f"{text!r} is not a decimal {kind}", node.start_mark)
        return convert(text)
    return construct


_StrictLoader.add_constructor(INT_TAG, _number(INT_FORM, "whole number", lambda text: int(text, 10)))
def _decimal_float(text: str) -> float:
    special = {".inf": math.inf, "+.inf": math.inf, "-.inf": -math.inf, ".nan": math.nan}
    return special[text.lower()] if text.lower() in special else float(text)


_StrictLoader.add_constructor(FLOAT_TAG, _number(FLOAT_FORM, "number", _decimal_float))


def load_yaml_mapping(path: str | Path, what: str) -> dict:
    """The top-level mapping of the YAML file `path` ({} for an empty file).

    `what` names the file in errors, e.g. "recipe" or "experiment file". Raises UserError (one
    line) for a missing or unreadable file, invalid YAML, a repeated key, or a top level that is
    not a mapping."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist or is not a file; check the path")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {what} {path} ({type(e).__name__}); pass a readable UTF-8 YAML file") from None
    try:
        raw = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except _DuplicateKey as e:
        raise UserError(f"{what} {path} gives the key {e.key!r} twice (lines {e.first} and {e.line}); "
                        "keep one of them") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark is not None else ""
        first = getattr(e, "problem", None) or (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"{what} {path} is not valid YAML ({first}{where}); fix the file") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UserError(f"{what} {path} must be a mapping of key: value at the top level, not a "
                        f"{type(raw).__name__}; see the examples in the README")
    return raw
