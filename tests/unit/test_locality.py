"""Locality and tiers (SPEC.md sections 2 and 3)."""

from __future__ import annotations

import pytest

from kmesh_plugin.model import Locality, LocalityLabels, Scope, tier

PREFER_CLOSE = (Scope.NETWORK, Scope.REGION, Scope.ZONE, Scope.SUBZONE)
PREFER_SAME_NODE = (Scope.NETWORK, Scope.REGION, Scope.ZONE, Scope.SUBZONE, Scope.NODE)

WORKER1 = Locality("", "region", "zone1", "subzone1", "worker1")
WORKER2 = Locality("", "region", "zone1", "subzone2", "worker2")
WORKER3 = Locality("", "region", "zone2", "subzone3", "worker3")


# -- tier() -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("endpoint", "expected"),
    [
        (WORKER1, 0),  # same node: every PreferClose scope matches
        (WORKER2, 1),  # subzone differs
        (WORKER3, 2),  # zone differs (subzone not counted after the mismatch)
        (Locality("", "other", "zone1", "subzone1", "x"), 3),  # region differs
        (Locality("net2", "region", "zone1", "subzone1", "x"), 4),  # network differs
    ],
)
def test_tier_seed_topology(endpoint: Locality, expected: int) -> None:
    assert tier(WORKER1, endpoint, PREFER_CLOSE) == expected


def test_tier_counts_leading_matches_only() -> None:
    # Zone and subzone labels match, but the region does not: nothing after REGION counts.
    client = Locality("n", "r1", "z", "s", "node-a")
    endpoint = Locality("n", "r2", "z", "s", "node-b")
    assert tier(client, endpoint, PREFER_CLOSE) == 3
    # Network differs: even a full match of everything else gives the worst tier.
    endpoint = Locality("other", "r1", "z", "s", "node-a")
    assert tier(client, endpoint, PREFER_SAME_NODE) == 5


def test_tier_same_zone_name_in_other_region_is_not_same_zone() -> None:
    client = Locality("", "eu", "zone-a", "", "n1")
    endpoint = Locality("", "us", "zone-a", "", "n2")
    assert tier(client, endpoint, (Scope.NETWORK, Scope.REGION, Scope.ZONE)) == 2


def test_tier_empty_equals_empty() -> None:
    # Nodes without any topology label are all in the same (empty) locality: tier 0.
    assert tier(Locality(node="a"), Locality(node="b"), PREFER_CLOSE) == 0
    # An empty label never matches a set one.
    client = Locality("", "region", "", "", "a")
    assert tier(client, Locality("", "region", "zone1", "", "b"), PREFER_CLOSE) == 2
    assert tier(client, Locality("", "region", "", "", "b"), PREFER_CLOSE) == 0


def test_tier_node_scope() -> None:
    assert tier(WORKER1, WORKER1, (Scope.NODE,)) == 0
    other_node = Locality("", "region", "zone1", "subzone1", "worker1b")
    assert tier(WORKER1, other_node, (Scope.NODE,)) == 1
    # Same node name but a different subzone: PreferSameNode stops at SUBZONE.
    assert tier(WORKER1, Locality("", "region", "zone1", "x", "worker1"), PREFER_SAME_NODE) == 2


def test_tier_follows_the_order_of_the_preference() -> None:
    # ZONE first: a zone mismatch stops counting even though the region matches.
    client = Locality("", "r", "z1", "", "a")
    endpoint = Locality("", "r", "z2", "", "b")
    assert tier(client, endpoint, (Scope.ZONE, Scope.REGION)) == 2
    assert tier(client, endpoint, (Scope.REGION, Scope.ZONE)) == 1


def test_tier_empty_preference_is_zero() -> None:
    assert tier(WORKER1, WORKER3, ()) == 0


# -- LocalityLabels.locality_of -------------------------------------------------------------


def test_locality_of_default_labels() -> None:
    labels = {
        "topology.istio.io/network": "net1",
        "topology.kubernetes.io/region": "region",
        "topology.kubernetes.io/zone": "zone1",
        "topology.istio.io/subzone": "subzone1",
        "kubernetes.io/hostname": "ignored",
    }
    assert LocalityLabels().locality_of("worker1", labels) == Locality(
        "net1", "region", "zone1", "subzone1", "worker1"
    )


def test_locality_of_istio_subzone_wins() -> None:
    labels = {
        "topology.istio.io/subzone": "istio-sz",
        "topology.kubernetes.io/subzone": "k8s-sz",
    }
    assert LocalityLabels().locality_of("n", labels).subzone == "istio-sz"


def test_locality_of_seed_subzone_label_accepted() -> None:
    labels = {
        "topology.kubernetes.io/region": "region",
        "topology.kubernetes.io/zone": "zone1",
        "topology.kubernetes.io/subzone": "subzone1",
    }
    assert LocalityLabels().locality_of("worker1", labels) == WORKER1


def test_locality_of_empty_istio_subzone_falls_back_to_the_next_key() -> None:
    # "The first label that is set wins": an empty value is not set.
    labels = {"topology.istio.io/subzone": "", "topology.kubernetes.io/subzone": "sz"}
    assert LocalityLabels().locality_of("n", labels).subzone == "sz"


def test_locality_of_missing_labels_are_empty() -> None:
    assert LocalityLabels().locality_of("n", {}) == Locality("", "", "", "", "n")


def test_locality_of_default_network() -> None:
    ll = LocalityLabels(default_network="main")
    assert ll.locality_of("n", {}).network == "main"
    assert ll.locality_of("n", {"topology.istio.io/network": "net2"}).network == "net2"
    # Two nodes without a network label end up in the same (default) network.
    assert tier(ll.locality_of("a", {}), ll.locality_of("b", {}), (Scope.NETWORK,)) == 0


def test_locality_of_configured_label_keys() -> None:
    ll = LocalityLabels(
        network="ex/net", region="ex/region", zone="ex/zone", subzone=("ex/sz",),
        default_network="dflt",
    )
    labels = {
        "ex/region": "r", "ex/zone": "z", "ex/sz": "s",
        # The default keys are no longer read.
        "topology.kubernetes.io/region": "wrong",
        "topology.istio.io/subzone": "wrong",
    }
    assert ll.locality_of("n", labels) == Locality("dflt", "r", "z", "s", "n")


def test_locality_get_and_str() -> None:
    assert [WORKER2.get(s) for s in Scope] == ["", "region", "zone1", "subzone2", "worker2"]
    assert str(WORKER2) == "network=-/region=region/zone=zone1/subzone=subzone2/node=worker2"
