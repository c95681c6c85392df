"""Label and field selectors of the lab's API server: the syntax and meaning of apimachinery."""

from __future__ import annotations

import pytest

from kmesh_lab.apiserver.selectors import FieldSelector, LabelSelector, SelectorError

LABELS = {"app": "web", "tier": "front", "version": "3"}


@pytest.mark.parametrize(
    ("selector", "matches"),
    [
        ("", True),
        ("app=web", True),
        ("app==web", True),
        ("app=db", False),
        ("app!=db", True),
        ("app!=web", False),
        ("missing!=x", True),  # != matches objects without the key
        ("app in (db, web)", True),
        ("app in (db)", False),
        ("app notin (db)", True),
        ("app notin (db,web)", False),
        ("missing notin (x)", True),  # so does notin
        ("missing in (x)", False),
        ("app", True),
        ("missing", False),
        ("!missing", True),
        ("!app", False),
        ("version>2", True),
        ("version<3", False),
        ("missing>1", False),
        ("app=web,tier=front", True),
        ("app=web, tier=back", False),
        ("  app = web ,  !missing  ", True),
        ("missing=", False),
        ("missing!=", True),  # absent differs from every value, the empty one too
        ("app!=", True),
    ],
)
def test_label_selector_matches_as_kubernetes(selector: str, matches: bool) -> None:
    assert LabelSelector.parse(selector).matches(LABELS) is matches


def test_kube_proxy_selector_excludes_headless_and_foreign_services() -> None:
    selector = LabelSelector.parse(
        "!service.kubernetes.io/headless,!service.kubernetes.io/service-proxy-name")
    assert selector.matches({"app": "x"})
    assert not selector.matches({"service.kubernetes.io/headless": ""})
    assert not selector.matches({"service.kubernetes.io/service-proxy-name": "other"})


def test_empty_value_is_selectable() -> None:
    assert LabelSelector.parse("k=").matches({"k": ""})
    assert not LabelSelector.parse("k=").matches({"k": "v"})


@pytest.mark.parametrize(
    "selector",
    ["app in web", "=web", "app in ()", "app=web tier", "-bad=x", "app=we b", "app>x",
     "Prefix.Upper/app=x", "app in (a", "app=web,"],
)
def test_malformed_label_selectors_are_errors(selector: str) -> None:
    with pytest.raises(SelectorError):
        LabelSelector.parse(selector)


def test_prefixed_keys() -> None:
    selector = LabelSelector.parse("topology.kubernetes.io/zone in (z1,z2)")
    assert selector.matches({"topology.kubernetes.io/zone": "z2"})
    assert not selector.matches({"zone": "z2"})


FIELDS = {"metadata.name": "web", "metadata.namespace": "demo", "spec.nodeName": ""}


@pytest.mark.parametrize(
    ("selector", "matches"),
    [
        ("", True),
        ("metadata.name=web", True),
        ("metadata.name==web", True),
        ("metadata.name!=web", False),
        ("metadata.name=web,metadata.namespace=demo", True),
        ("metadata.name=web,metadata.namespace!=demo", False),
        ("spec.nodeName=", True),  # an unset field is the empty string
        ("spec.nodeName!=", False),
        ("status.phase=", True),  # so is a field the object does not have
    ],
)
def test_field_selector_matches(selector: str, matches: bool) -> None:
    assert FieldSelector.parse(selector).matches(FIELDS) is matches


def test_field_selector_escapes() -> None:
    selector = FieldSelector.parse(r"metadata.name=a\,b\=c\\d")
    assert selector.requirements[0].value == "a,b=c\\d"
    assert selector.matches({"metadata.name": "a,b=c\\d"})


@pytest.mark.parametrize("selector", ["metadata.name", "=web", "metadata.name=a=b",
                                      r"metadata.name=a\x"])
def test_malformed_field_selectors_are_errors(selector: str) -> None:
    with pytest.raises(SelectorError):
        FieldSelector.parse(selector)


def test_unsupported_field_is_named() -> None:
    selector = FieldSelector.parse("metadata.name=a,spec.bogus=b")
    assert selector.unsupported(["metadata.name", "metadata.namespace"]) == "spec.bogus"
    assert FieldSelector.parse("metadata.name=a").unsupported(["metadata.name"]) is None
