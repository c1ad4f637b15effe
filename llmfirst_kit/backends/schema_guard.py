"""A client's JSON schema (structured output), checked before any library reads it.

Two libraries read a structured-output schema: ``fastjsonschema`` (is it a valid schema?) and llama.cpp's
converter (``json_schema_to_gbnf``: schema -> grammar). Neither is safe on a hostile schema:

- ``$ref``: fastjsonschema resolves any non-local reference with ``urllib`` -- a ``$ref`` to
  ``http://...`` makes the server send a GET wherever the client points it, and ``file:`` reads local
  files. Only in-document references (``#/...``) are accepted here, and they must point into the
  document; fastjsonschema is also given :data:`NO_FETCH`, which refuses every scheme, in case a
  reference reaches it some other way (e.g. through an ``$id`` that changes the base URI).
- repetition counts: the converter writes ``minItems``/``maxItems``, ``minLength``/``maxLength`` and the
  ``{m,n}`` quantifiers of a ``pattern`` out as that many copies of a rule, so a tiny schema with
  ``"minItems": 1000000000`` becomes a grammar of gigabytes before any size check on the grammar can run.
  The counts are added up while walking the schema and refused beyond :data:`MAX_SCHEMA_REPETITIONS`;
  an estimate of the characters they expand into (a count times the length of the repeated rule's name,
  which grows with property names) is refused beyond :data:`MAX_GRAMMAR_CHARS`.
- size and shape: ``fastjsonschema.compile`` generates and compiles Python code for the whole schema before
  any size check could run (one schema of 20,000 properties: +807 MB of memory, 2.3 s), its generated code
  breaks on deep nesting, and both libraries raise on shapes they do not expect (``"$ref": {}``,
  ``"properties": []``, ``"items": 5``, a ``pattern`` that is not a regular expression). So the walk also counts
  the schema's nodes, its depth and its characters, checks each keyword's shape, and compiles each pattern
  (bounded in length and group nesting) -- cheap, iterative code that runs before either library.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping
from typing import Any, Callable

MAX_SCHEMA_REPETITIONS = 4096  # all repetition counts of one schema, added up (each is written out that often)
MAX_GRAMMAR_CHARS = 256 * 1024  # the largest grammar (characters) a schema may turn into, estimated or made
MAX_SCHEMA_NODES = 2000  # objects and arrays in one schema (each property is one)
MAX_SCHEMA_DEPTH = 32  # nesting of objects and arrays
MAX_SCHEMA_CHARS = 64 * 1024  # characters of keys and strings in one schema
MAX_PATTERN_CHARS = 1000  # one pattern's length
MAX_PATTERN_NESTING = 32  # one pattern's group nesting

SCHEMA_OR_BOOL = ("additionalProperties", "additionalItems", "not", "contains", "propertyNames", "if", "then",
                  "else", "unevaluatedItems", "unevaluatedProperties")
SCHEMA_LISTS = ("allOf", "anyOf", "oneOf", "prefixItems")
WHOLE_NUMBERS = ("minItems", "maxItems", "minLength", "maxLength", "minProperties", "maxProperties")

ACCEPTED_REFS = "in-document references only ('#/...', e.g. '#/$defs/Item')"
REPEAT_PAIRS = (("minItems", "maxItems"), ("minLength", "maxLength"))
DATA_KEYWORDS = frozenset({"const", "enum", "default", "examples"})  # values there are data, not schemas
NAME_MAPS = frozenset({"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"})
_QUANTIFIER = re.compile(r"\{([^{}]*)\}")


def schema_problem(schema: Any) -> str | None:
    """Why this client schema is refused before any library reads it (a non-local ``$ref``, or
    repetition counts that would expand into too large a grammar), or None."""
    if not isinstance(schema, dict):
        return None
    problem = _size_problem(schema)
    if problem:
        return problem
    total = 0
    chars = 0
    largest: tuple[int, str] = (0, "")
    for node, path, kind in _walk(schema):
        if kind == "schema":
            problem = _shape_problem(node, path)
            if problem:
                return f"not a valid JSON schema: {problem}"
        ref = node.get("$ref")
        if isinstance(ref, str):
            problem = _ref_problem(schema, ref, path)
            if problem:
                return problem
        if kind != "schema":
            continue
        for what, count, unit in _repetitions(node, path):
            if count is None:
                return (f"the grammar made from this JSON schema would be too large: {what} at {_where(path)} is not a "
                        f"finite count; give a whole number up to {MAX_SCHEMA_REPETITIONS} (MAX_SCHEMA_REPETITIONS)")
            total += count
            chars += count * unit
            if count > largest[0]:
                largest = (count, f"{what} at {_where(path)}")
            if total > MAX_SCHEMA_REPETITIONS:
                return (f"the grammar made from this JSON schema would be too large: its repetition counts "
                        f"(minItems/maxItems, minLength/maxLength, {{m,n}} in patterns) add up to more than "
                        f"{MAX_SCHEMA_REPETITIONS} (MAX_SCHEMA_REPETITIONS), and each is written out that many "
                        f"times; the largest is {largest[1]}; lower those limits")
            if chars > MAX_GRAMMAR_CHARS:
                return (f"the grammar made from this JSON schema would be too large: its repetitions (the largest: "
                        f"{largest[1]}) expand into more than {MAX_GRAMMAR_CHARS} characters (MAX_GRAMMAR_CHARS); "
                        f"lower those limits or shorten the property names")
    return None


def _size_problem(schema: dict[str, Any]) -> str | None:
    """Too many nodes, too deep or too many characters: counted without recursion, stopping at the first limit."""
    nodes = chars = 0
    stack: list[tuple[Any, int]] = [(schema, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            chars += len(value)
        elif isinstance(value, (dict, list)):
            nodes += 1
            if depth > MAX_SCHEMA_DEPTH:
                return (f"this JSON schema nests deeper than {MAX_SCHEMA_DEPTH} levels (MAX_SCHEMA_DEPTH); "
                        f"flatten it (use $defs and in-document $ref for shared parts)")
            if nodes > MAX_SCHEMA_NODES:
                return (f"this JSON schema has more than {MAX_SCHEMA_NODES} objects and arrays (MAX_SCHEMA_NODES); "
                        f"a structured answer needs far fewer properties: simplify it")
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for key, child in items:
                chars += len(key) if isinstance(key, str) else 0
                stack.append((child, depth + 1))
        if chars > MAX_SCHEMA_CHARS:
            return (f"this JSON schema has more than {MAX_SCHEMA_CHARS} characters of names and strings "
                    f"(MAX_SCHEMA_CHARS); shorten it")
    return None


def _shape_problem(node: dict[str, Any], path: tuple[str, ...]) -> str | None:
    """A keyword whose value has a shape no JSON schema allows (the libraries would raise on it), or None."""
    def bad(key: str, expected: str) -> str:
        text = repr(node[key])
        return f"{key} at {_where(path)} must be {expected}, got {text if len(text) <= 60 else text[:57] + '...'}"

    if "$ref" in node and not isinstance(node["$ref"], str):
        return bad("$ref", "a string (an in-document reference such as '#/$defs/Item')")
    for key in NAME_MAPS:
        if key in node and not isinstance(node[key], dict):
            return bad(key, "an object of schemas")
    for key in SCHEMA_OR_BOOL:
        if key in node and not isinstance(node[key], (dict, bool)):
            return bad(key, "a schema (an object) or a boolean")
    for key in SCHEMA_LISTS:
        if key in node and not (isinstance(node[key], list) and all(isinstance(s, (dict, bool)) for s in node[key])):
            return bad(key, "a list of schemas")
    if "items" in node and not isinstance(node["items"], (dict, bool, list)):
        return bad("items", "a schema (an object), a boolean or a list of schemas")
    if isinstance(node.get("items"), list) and not all(isinstance(s, (dict, bool)) for s in node["items"]):
        return bad("items", "a schema (an object), a boolean or a list of schemas")
    if "required" in node and not (isinstance(node["required"], list)
                                   and all(isinstance(r, str) for r in node["required"])):
        return bad("required", "a list of property names")
    if "enum" in node and not isinstance(node["enum"], list):
        return bad("enum", "a list of values")
    if "type" in node and not (isinstance(node["type"], str) or (
            isinstance(node["type"], list) and all(isinstance(t, str) for t in node["type"]))):
        return bad("type", "a type name or a list of type names")
    for key in WHOLE_NUMBERS:
        if key in node and not (_is_number(node[key]) and node[key] >= 0):
            return bad(key, "a number of at least 0")
    deps = node.get("dependencies", node.get("dependentRequired"))
    key = "dependencies" if "dependencies" in node else "dependentRequired"
    if deps is not None and not (isinstance(deps, dict) and all(
            isinstance(v, (dict, bool)) or (isinstance(v, list) and all(isinstance(x, str) for x in v))
            for v in deps.values())):
        return bad(key, "an object of schemas or lists of property names")
    if "pattern" in node:
        return _pattern_problem(node["pattern"], path)
    return None


def _pattern_problem(pattern: Any, path: tuple[str, ...]) -> str | None:
    if not isinstance(pattern, str):
        return f"pattern at {_where(path)} must be a string (a regular expression)"
    if len(pattern) > MAX_PATTERN_CHARS:
        return f"pattern at {_where(path)} is longer than {MAX_PATTERN_CHARS} characters (MAX_PATTERN_CHARS); shorten it"
    depth = deepest = 0
    escaped = False
    for ch in pattern:  # group nesting, before the regular-expression compiler recurses into it
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif ch == ")":
            depth -= 1
    if deepest > MAX_PATTERN_NESTING:
        return (f"pattern at {_where(path)} nests groups deeper than {MAX_PATTERN_NESTING} (MAX_PATTERN_NESTING); "
                f"simplify it")
    try:
        re.compile(pattern)
    except (re.error, RecursionError, OverflowError) as exc:
        return f"pattern at {_where(path)} is not a regular expression ({exc})"
    return None


def _walk(schema: dict[str, Any]) -> Iterator[tuple[dict[str, Any], tuple[str, ...], str]]:
    """Every object in the document with its JSON-pointer path and what it is: ``schema`` (a (sub)schema),
    ``names`` (the map under ``properties``, ``$defs``...: its keys are names, its values schemas) or
    ``data`` (under ``const``, ``enum``, ``default``, ``examples``). Iterative: no recursion limit."""
    stack: list[tuple[Any, tuple[str, ...], str]] = [(schema, (), "schema")]
    while stack:
        value, path, kind = stack.pop()
        if isinstance(value, list):
            stack.extend((item, (*path, str(i)), kind) for i, item in enumerate(value))
            continue
        if not isinstance(value, dict):
            continue
        yield value, path, kind
        for key, child in value.items():
            if kind == "names":
                child_kind = "schema"
            elif kind == "data" or key in DATA_KEYWORDS:
                child_kind = "data"
            elif key in NAME_MAPS:
                child_kind = "names"
            else:
                child_kind = "schema"
            stack.append((child, (*path, str(key)), child_kind))


def _ref_problem(root: dict[str, Any], ref: str, path: tuple[str, ...]) -> str | None:
    if not ref.startswith("#/"):
        kind = "a file reference" if ref.lower().startswith("file:") else (
            "a remote reference" if "://" in ref else "not an in-document reference")
        return (f"$ref {_short(ref)} at {_where(path)} is {kind}; this server accepts {ACCEPTED_REFS} and never "
                f"fetches or opens what a schema names: put the referenced schema under $defs and point at it")
    target: Any = root
    for part in ref[2:].split("/"):  # as llama.cpp's converter reads the pointer
        if isinstance(target, dict) and part in target:
            target = target[part]
        elif isinstance(target, list) and part.isdigit() and int(part) < len(target):
            target = target[int(part)]
        else:
            return (f"$ref {_short(ref)} at {_where(path)} points at nothing in this schema ({part!r} not found); "
                    f"this server accepts {ACCEPTED_REFS}")
    return None


def _repetitions(node: dict[str, Any], path: tuple[str, ...]) -> Iterator[tuple[str, int | None, int]]:
    """(what, count, characters per repetition) for each repetition the converter would write out of this
    schema node; count None when it is not a finite number."""
    name_len = len("/".join(path)) + 16  # the converter names a rule after its path (an upper bound)
    for low, high in REPEAT_PAIRS:
        unit = name_len if low == "minItems" else 8  # a string repeats the 4-letter rule `char`
        # min copies, then (max - min) optional ones: max(min, max) in all
        given = [(k, node[k], _count(node[k])) for k in (low, high) if _is_number(node.get(k))]
        if given:
            key, value, count = max(given, key=lambda g: math.inf if g[2] is None else g[2])
            yield f"{key} {value}", count, unit
    pattern = node.get("pattern")
    if isinstance(pattern, str):
        unit = len(pattern) + name_len  # a repeated literal or group is copied, or named after the path
        for match in _QUANTIFIER.finditer(pattern):
            numbers = [p.strip() for p in match.group(1).split(",")]
            if not all(p.isdigit() or p == "" for p in numbers) or len(numbers) > 2:
                continue  # not a quantifier the converter reads; it will refuse the pattern itself
            yield f"pattern quantifier {match.group(0)}", max(int(p) for p in numbers if p) if any(numbers) else 0, unit


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _count(value: int | float) -> int | None:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return max(0, int(value))


def _where(path: tuple[str, ...], limit: int = 100) -> str:
    if not path:
        return "the top level (#)"
    text = "#/" + "/".join(path)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _short(value: str, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _NoFetch(Mapping[str, Callable[[str], Any]]):
    """fastjsonschema's ``handlers``: claims every URI scheme and refuses it, so the validator never fetches
    a URL or opens a file (its fallback for a scheme without a handler is ``urllib.request.urlopen``)."""

    def __contains__(self, scheme: object) -> bool:
        return True

    def __getitem__(self, scheme: str) -> Callable[[str], Any]:
        return _refuse_fetch

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0


def _refuse_fetch(uri: str) -> Any:
    import fastjsonschema

    raise fastjsonschema.JsonSchemaDefinitionException(
        f"the schema refers to {uri!r}, outside the document; this server accepts {ACCEPTED_REFS}")


NO_FETCH: Mapping[str, Callable[[str], Any]] = _NoFetch()
