"""cni.namespace_selector: equality-based label selectors, and refusals that say what is wrong."""

from __future__ import annotations

import pytest

from kmesh_plugin.model.selector import parse

LABELS = {"istio.io/dataplane-mode": "kmesh", "team": "a", "tier": ""}


@pytest.mark.parametrize(("text", "matches"), [
    ("", True),
    ("istio.io/dataplane-mode=kmesh", True),
    ("istio.io/dataplane-mode==kmesh", True),
    ("istio.io/dataplane-mode=ambient", False),
    ("team!=b", True),
    ("team!=a", False),
    ("absent!=x", True),
    ("team", True),
    ("absent", False),
    ("!absent", True),
    ("!team", False),
    ("tier=", True),
    (" team = a , istio.io/dataplane-mode=kmesh ", True),
    ("team=a,absent", False),
])
def test_matching(text: str, matches: bool) -> None:
    assert parse(text).matches(LABELS) is matches


@pytest.mark.parametrize(("text", "says"), [
    ("team in (a,b)", "set-based"),
    ("env notin (x)", "set-based"),
    ("-bad=x", "not a label key"),
    ("team=a b", "not a label value"),
    ("a,,b", "not a label key"),
    ("Upper.Case/x=y", "not a label key"),
])
def test_refusals_name_the_part(text: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        parse(text)
