"""The three patch formats kube-apiserver accepts for built-in kinds.

* :func:`merge_patch`: JSON merge patch, RFC 7386 (``application/merge-patch+json``).
* :func:`json_patch`: JSON patch, RFC 6902 (``application/json-patch+json``): add, remove,
  replace, move, copy, test, with JSON pointers (RFC 6901) and ``-`` for appending.
* :func:`strategic_merge_patch`: Kubernetes' strategic merge patch
  (``application/strategic-merge-patch+json``). Lists that Kubernetes merges (the resource
  table's :class:`~.resources.MergeRule` by path) are merged element by element by their
  merge key, or as a set for primitive lists; every other list is replaced. The directives
  ``$patch: replace | delete | merge`` (on maps and as list elements),
  ``$setElementOrder/<field>``, ``$retainKeys`` and ``$deleteFromPrimitiveList/<field>`` are
  applied, which is what ``kubectl apply``, ``kubectl label`` and ``kubectl patch`` send.

Every function returns a new document and leaves its arguments untouched. Failures raise
:class:`PatchError` carrying the HTTP code the real server would answer: 400 for a patch it
cannot read, 422 for one that does not apply to the object.

Left out: the ordering subtleties of ``$setElementOrder`` (items the patch does not list,
such as ones another client added, go after the listed ones instead of keeping their
interleaved place), and the validation errors the real server gives for malformed
directives beyond the ones that matter for well-formed clients.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from .resources import MergeRule, Path

PATCH_DIRECTIVE = "$patch"
RETAIN_KEYS = "$retainKeys"
SET_ELEMENT_ORDER = "$setElementOrder/"
DELETE_FROM_PRIMITIVE_LIST = "$deleteFromPrimitiveList/"


class PatchError(ValueError):
    def __init__(self, message: str, code: int = 400) -> None:
        super().__init__(message)
        self.code = code


# --- RFC 7386 -------------------------------------------------------------------------


def merge_patch(target: Any, patch: Any) -> Any:
    """Apply a JSON merge patch: objects merge, ``null`` removes, anything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


# --- RFC 6902 -------------------------------------------------------------------------


def _pointer(path: Any) -> list[str]:
    if not isinstance(path, str):
        raise PatchError(f"JSON patch path must be a string, got {path!r}")
    if path == "":
        return []
    if not path.startswith("/"):
        raise PatchError(f"JSON pointer {path!r} must start with '/'")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _index(container: list[Any], token: str, path: str, allow_end: bool) -> int:
    if allow_end and token == "-":
        return len(container)
    if not token.isdigit() or (token != "0" and token.startswith("0")):
        raise PatchError(f"invalid array index {token!r} in {path!r}", 422)
    index = int(token)
    if index > len(container) or (index == len(container) and not allow_end):
        raise PatchError(f"array index {index} out of bounds in {path!r}", 422)
    return index


def _parent(doc: Any, tokens: list[str], path: str) -> Any:
    node = doc
    for token in tokens[:-1]:
        if isinstance(node, dict):
            if token not in node:
                raise PatchError(f"doc is missing path: {path!r}", 422)
            node = node[token]
        elif isinstance(node, list):
            node = node[_index(node, token, path, allow_end=False)]
        else:
            raise PatchError(f"doc is missing path: {path!r}", 422)
    return node


def _get(doc: Any, path: str) -> Any:
    tokens = _pointer(path)
    if not tokens:
        return doc
    parent = _parent(doc, tokens, path)
    last = tokens[-1]
    if isinstance(parent, dict):
        if last not in parent:
            raise PatchError(f"doc is missing path: {path!r}", 422)
        return parent[last]
    if isinstance(parent, list):
        return parent[_index(parent, last, path, allow_end=False)]
    raise PatchError(f"doc is missing path: {path!r}", 422)


def _add(doc: Any, path: str, value: Any) -> Any:
    tokens = _pointer(path)
    if not tokens:
        return value
    parent = _parent(doc, tokens, path)
    last = tokens[-1]
    if isinstance(parent, dict):
        parent[last] = value
    elif isinstance(parent, list):
        parent.insert(_index(parent, last, path, allow_end=True), value)
    else:
        raise PatchError(f"doc is missing path: {path!r}", 422)
    return doc


def _remove(doc: Any, path: str) -> tuple[Any, Any]:
    tokens = _pointer(path)
    if not tokens:
        raise PatchError("cannot remove the whole document", 422)
    parent = _parent(doc, tokens, path)
    last = tokens[-1]
    if isinstance(parent, dict):
        if last not in parent:
            raise PatchError(f"unable to remove nonexistent key: {last}: missing value", 422)
        return doc, parent.pop(last)
    if isinstance(parent, list):
        return doc, parent.pop(_index(parent, last, path, allow_end=False))
    raise PatchError(f"doc is missing path: {path!r}", 422)


def json_patch(document: Any, operations: Any) -> Any:
    """Apply an RFC 6902 JSON patch (a list of operations) to a copy of ``document``."""
    if not isinstance(operations, list):
        raise PatchError("a JSON patch must be a list of operations")
    doc = copy.deepcopy(document)
    for operation in operations:
        if not isinstance(operation, dict) or "op" not in operation:
            raise PatchError(f"invalid JSON patch operation {operation!r}")
        op = operation["op"]
        path = operation.get("path")
        if op in ("add", "replace", "test") and "value" not in operation:
            raise PatchError(f"JSON patch operation {op!r} at {path!r} needs a value")
        if op == "add":
            doc = _add(doc, path, copy.deepcopy(operation["value"]))
        elif op == "remove":
            doc, _ = _remove(doc, path)
        elif op == "replace":
            _get(doc, path)  # must exist
            if _pointer(path):
                doc, _ = _remove(doc, path)
            doc = _add(doc, path, copy.deepcopy(operation["value"]))
        elif op in ("move", "copy"):
            source = operation.get("from")
            value = copy.deepcopy(_get(doc, source))
            if op == "move":
                if isinstance(path, str) and isinstance(source, str) and \
                        path.startswith(source + "/"):
                    raise PatchError(f"cannot move {source!r} into its own child {path!r}", 422)
                doc, value = _remove(doc, source)
            doc = _add(doc, path, value)
        elif op == "test":
            if _get(doc, path) != operation["value"]:
                raise PatchError(f"testing value {path} failed: test failed", 422)
        else:
            raise PatchError(f"unexpected JSON patch operation {op!r}")
    return doc


# --- strategic merge patch ------------------------------------------------------------


class _Deleted:
    """Marker: a ``$patch: delete`` map, to be removed from its parent."""


_DELETED = _Deleted()


def strategic_merge_patch(
    original: Mapping[str, Any], patch: Any, rules: Mapping[Path, MergeRule]
) -> dict[str, Any]:
    """Apply a strategic merge patch to a copy of ``original`` under ``rules``."""
    if not isinstance(patch, dict):
        raise PatchError("a strategic merge patch must be a JSON object")
    merged = _merge_map(copy.deepcopy(dict(original)), patch, (), rules)
    return {} if isinstance(merged, _Deleted) else merged


def _merge_map(
    original: dict[str, Any], patch: dict[str, Any], path: Path, rules: Mapping[Path, MergeRule]
) -> dict[str, Any] | _Deleted:
    directive = patch.get(PATCH_DIRECTIVE)
    if directive == "delete":
        return _DELETED
    if directive == "replace":
        return _merge_map({}, {k: v for k, v in patch.items() if k != PATCH_DIRECTIVE},
                          path, rules)
    if directive not in (None, "merge"):
        raise PatchError(f"Unknown patch type: {directive}")

    result = original
    retain = patch.get(RETAIN_KEYS)
    if retain is not None:
        if not isinstance(retain, list):
            raise PatchError("$retainKeys must be a list of field names")
        # Fields the object has and the patch does not list are cleared (retainKeys strategy:
        # a union such as a volume source or a deployment strategy switching its member).
        result = {k: v for k, v in result.items() if k in retain}

    for key, value in patch.items():
        if key.startswith(DELETE_FROM_PRIMITIVE_LIST):
            field = key[len(DELETE_FROM_PRIMITIVE_LIST):]
            if not isinstance(value, list):
                raise PatchError(f"{key} must be a list")
            if isinstance(result.get(field), list):
                result[field] = [item for item in result[field] if item not in value]

    for key, value in patch.items():
        if key.startswith("$"):
            continue
        sub = (*path, key)
        if value is None:
            result.pop(key, None)
        elif isinstance(value, dict):
            current = result.get(key)
            merged = _merge_map(current if isinstance(current, dict) else {}, value, sub, rules)
            if isinstance(merged, _Deleted):
                result.pop(key, None)
            else:
                result[key] = merged
        elif isinstance(value, list):
            rule = rules.get(sub)
            current = result.get(key)
            if rule is None:
                result[key] = _replace_list(value, sub, rules)
            else:
                result[key] = _merge_list(
                    current if isinstance(current, list) else [], value, sub, rule, rules)
        else:
            result[key] = value

    for key, value in patch.items():
        if key.startswith(SET_ELEMENT_ORDER):
            field = key[len(SET_ELEMENT_ORDER):]
            if not isinstance(value, list):
                raise PatchError(f"{key} must be a list")
            rule = rules.get((*path, field))
            if rule is not None and isinstance(result.get(field), list):
                result[field] = _order(result[field], value, rule)
    return result


def _replace_list(items: list[Any], path: Path, rules: Mapping[Path, MergeRule]) -> list[Any]:
    """A list the patch replaces whole: its maps lose their directives."""
    out: list[Any] = []
    for item in items:
        if isinstance(item, dict):
            if item.get(PATCH_DIRECTIVE) in ("delete", "replace") and len(item) == 1:
                continue
            merged = _merge_map({}, item, path, rules)
            if not isinstance(merged, _Deleted):
                out.append(merged)
        else:
            out.append(copy.deepcopy(item))
    return out


def _merge_list(
    original: list[Any], patch: list[Any], path: Path, rule: MergeRule,
    rules: Mapping[Path, MergeRule],
) -> list[Any]:
    if rule.key is None:
        result = list(original)
        for item in patch:
            if isinstance(item, (dict, list)):
                raise PatchError(f"{'.'.join(path)}: a primitive list patch holds {item!r}")
            if item not in result:
                result.append(item)
        return result

    if any(isinstance(item, dict) and item.get(PATCH_DIRECTIVE) == "replace" for item in patch):
        return _replace_list(
            [i for i in patch if not (isinstance(i, dict) and i.get(PATCH_DIRECTIVE) == "replace"
                                      and rule.key not in i)],
            path, rules)

    key = rule.key
    result = list(original)
    for item in patch:
        if not isinstance(item, dict):
            raise PatchError(f"{'.'.join(path)}: expected a map in a list merged by {key!r}, "
                             f"got {item!r}")
        if key not in item:
            raise PatchError(f"{'.'.join(path)}: map {item!r} does not contain declared merge "
                             f"key: {key}", 422)
        wanted = item[key]
        found = [i for i, existing in enumerate(result)
                 if isinstance(existing, dict) and existing.get(key) == wanted]
        if item.get(PATCH_DIRECTIVE) == "delete":
            result = [e for i, e in enumerate(result) if i not in found]
            continue
        if found:
            merged = _merge_map(result[found[0]], item, path, rules)
            if isinstance(merged, _Deleted):
                result.pop(found[0])
            else:
                result[found[0]] = merged
        else:
            merged = _merge_map({}, item, path, rules)
            if not isinstance(merged, _Deleted):
                result.append(merged)
    return result


def _order(items: list[Any], order: list[Any], rule: MergeRule) -> list[Any]:
    def identity(item: Any) -> Any:
        if rule.key is None:
            return item if not isinstance(item, (dict, list)) else None
        return item.get(rule.key) if isinstance(item, dict) else None

    positions: dict[Any, int] = {}
    for i, entry in enumerate(order):
        ident = identity(entry)
        if ident is not None and ident not in positions:
            positions[ident] = i
    listed = sorted((item for item in items if identity(item) in positions),
                    key=lambda item: positions[identity(item)])
    unlisted = [item for item in items if identity(item) not in positions]
    return listed + unlisted
