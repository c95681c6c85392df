"""Hooks are called through pluggy's plugin manager: hook wrappers, tracing, call monitoring
and ``firstresult`` behave as pluggy defines them, and every answer and every failure names
the plugin it came from."""

from __future__ import annotations

import logging
from collections.abc import Generator, Sequence
from typing import Any

import pytest

from kmesh_plugin import hookimpl
from kmesh_plugin.hookspecs import PRIORITY_THIRD_PARTY, StrategySettings
from kmesh_plugin.model import (
    Claim,
    EndpointInfo,
    Locality,
    Mode,
    NodeInfo,
    Scope,
    Service,
    Strategy,
)
from kmesh_plugin.model.objects import parse
from kmesh_plugin.plugins import PluginError, Plugins

SETTINGS = StrategySettings((Scope.NETWORK, Scope.REGION, Scope.ZONE, Scope.SUBZONE))
CLIENT = NodeInfo("w1", Locality(node="w1"))
ENDPOINTS = [EndpointInfo("198.19.0.1", 80, "w1", Locality(node="w1")),
             EndpointInfo("198.19.0.2", 80, "w2", Locality(node="w2"))]
STRICT = Strategy("Ranked", Mode.STRICT, (), "test")


def service(**spec: Any) -> Service:
    obj = parse({"apiVersion": "v1", "kind": "Service",
                 "metadata": {"name": "helloworld", "namespace": "sample"},
                 "spec": {"clusterIP": "198.18.0.10", "ports": [{"port": 5000}], **spec}})
    assert isinstance(obj, Service)
    return obj


LOCAL_AND_CLOSE = {"internalTrafficPolicy": "Local", "trafficDistribution": "PreferClose"}


@pytest.fixture
def plugins() -> Plugins:
    return Plugins.load(["local", "prefer_close"])


def tiers(plugins: Plugins) -> tuple[list[int | None], str] | None:
    return plugins.endpoint_tiers(STRICT, CLIENT, service(), ENDPOINTS)


class Ranker:
    """Ranks every endpoint in one tier (``answer``), or passes with None."""

    def __init__(self, answer: Any) -> None:
        self.answer = answer
        self.calls = 0

    @hookimpl
    def kmesh_endpoint_tiers(self, endpoints: Sequence[EndpointInfo]) -> Any:
        self.calls += 1
        if self.answer is None or not isinstance(self.answer, int):
            return self.answer
        return [self.answer for _ in endpoints]


class Observer:
    """A hook wrapper, as a third party writes one to watch the strategy hooks."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, Any]] = []

    @hookimpl(wrapper=True)
    def kmesh_strategy_claim(self, service: Service) -> Generator[None, Any, Any]:
        claims = yield
        self.seen.append(("claim", [c.strategy.name for c in claims]))
        return claims

    @hookimpl(wrapper=True)
    def kmesh_endpoint_tiers(self, strategy: Strategy) -> Generator[None, Any, Any]:
        answer = yield
        self.seen.append(("tiers", answer))
        return answer


# -- wrappers, tracing, monitoring ---------------------------------------------------------


def test_a_hook_wrapper_observes_the_strategy_hooks(plugins: Plugins) -> None:
    observer = Observer()
    plugins.register(Ranker(0), "ranker")
    plugins.register(observer, "observer")
    claims = plugins.claims(service(**LOCAL_AND_CLOSE), None, SETTINGS)
    assert [c.plugin for c in claims] == ["local", "prefer_close"]
    assert tiers(plugins) == ([0, 0], "ranker")
    # One call per hook: the wrapper sees every claim at once (pluggy's call order: the
    # last registered first) and firstresult's single answer, not a list of answers.
    assert observer.seen == [("claim", ["PreferClose", "Local"]), ("tiers", [0, 0])]


class Veto:
    """A hook wrapper that changes results: drops Local claims, replaces any ranking."""

    @hookimpl(wrapper=True)
    def kmesh_strategy_claim(self) -> Generator[None, Any, Any]:
        claims = yield
        return [c for c in claims if c.strategy.name != "Local"]

    @hookimpl(wrapper=True)
    def kmesh_endpoint_tiers(self) -> Generator[None, Any, Any]:
        answer = yield
        return None if answer is None else [1 for _ in answer]


def test_what_a_hook_wrapper_returns_is_used_and_attributed(plugins: Plugins) -> None:
    plugins.register(Ranker(0), "ranker")
    plugins.register(Veto(), "veto")
    claims = plugins.claims(service(**LOCAL_AND_CLOSE), None, SETTINGS)
    assert [(c.plugin, c.strategy.name) for c in claims] == [("prefer_close", "PreferClose")]
    # The ranking the core gets is the wrapper's, and is said to be.
    assert tiers(plugins) == ([1, 1], "veto")


def test_hook_call_monitoring_and_tracing_see_the_calls(plugins: Plugins) -> None:
    plugins.register(Ranker(0), "ranker")
    monitored: list[tuple[str, list[str]]] = []
    undo_monitor = plugins.pm.add_hookcall_monitoring(
        lambda name, impls, kwargs: monitored.append((name, [i.plugin_name for i in impls])),
        lambda outcome, name, impls, kwargs: None,
    )
    traced: list[str] = []
    plugins.pm.trace.root.setwriter(traced.append)
    undo_trace = plugins.pm.enable_tracing()
    try:
        plugins.claims(service(**LOCAL_AND_CLOSE), None, SETTINGS)
        tiers(plugins)
    finally:
        undo_trace()
        undo_monitor()
    assert monitored == [
        ("kmesh_strategy_claim", ["local", "prefer_close"]),
        ("kmesh_endpoint_tiers", ["ranker"]),
    ]
    assert any("kmesh_strategy_claim" in line for line in traced)
    assert any("kmesh_endpoint_tiers" in line for line in traced)


# -- firstresult ---------------------------------------------------------------------------


def test_firstresult_stops_at_the_first_ranking_plugin(plugins: Plugins) -> None:
    first_registered, last_registered = Ranker(1), Ranker(0)
    plugins.register(first_registered, "a")
    plugins.register(last_registered, "b")
    observer = Observer()
    plugins.register(observer, "observer")
    # pluggy calls the last registered first; its answer ends the call.
    assert tiers(plugins) == ([0, 0], "b")
    assert (first_registered.calls, last_registered.calls) == (0, 1)
    last_registered.answer = None
    assert tiers(plugins) == ([1, 1], "a")
    assert (first_registered.calls, last_registered.calls) == (1, 2)
    assert observer.seen == [("tiers", [0, 0]), ("tiers", [1, 1])]


def test_no_ranking_plugin_answers(plugins: Plugins) -> None:
    plugins.register(Ranker(None), "silent")
    assert tiers(plugins) is None


# -- blame ---------------------------------------------------------------------------------


def _fail(message: str) -> None:
    raise RuntimeError(message)


class Exploding:
    @hookimpl
    def kmesh_strategy_claim(self) -> None:
        _fail("plugin bug")  # raised one frame below the implementation

    @hookimpl
    def kmesh_endpoint_tiers(self) -> None:
        raise KeyError("no such rack")


def test_a_raising_plugin_is_named_and_its_exception_kept(plugins: Plugins) -> None:
    plugins.register(Exploding(), "exploding")
    with pytest.raises(PluginError) as info:
        plugins.claims(service(), None, SETTINGS)
    assert str(info.value) == (
        "plugin 'exploding': kmesh_strategy_claim raised RuntimeError: plugin bug"
    )
    assert isinstance(info.value.__cause__, RuntimeError)
    with pytest.raises(PluginError, match=r"^plugin 'exploding': kmesh_endpoint_tiers raised "
                                          r"KeyError: 'no such rack'$") as info:
        tiers(plugins)
    assert isinstance(info.value.__cause__, KeyError)


def test_a_raising_builtin_is_named(plugins: Plugins) -> None:
    # Without settings PreferClose cannot build its preference; local never reads them.
    with pytest.raises(PluginError, match=r"^plugin 'prefer_close': kmesh_strategy_claim "
                                          r"raised AttributeError"):
        plugins.claims(service(**LOCAL_AND_CLOSE), None, None)  # type: ignore[arg-type]


class Flaky:
    def __init__(self, fail: bool) -> None:
        self.fail = fail

    @hookimpl
    def kmesh_strategy_claim(self) -> None:
        if self.fail:
            raise RuntimeError("flaky")


def test_blame_tells_apart_two_instances_of_one_plugin_class(plugins: Plugins) -> None:
    # Both instances run the same code: the frame's own ``self`` says which one raised.
    plugins.register(Flaky(True), "flaky")
    plugins.register(Flaky(False), "calm")
    with pytest.raises(PluginError, match=r"^plugin 'flaky': kmesh_strategy_claim raised"):
        plugins.claims(service(), None, SETTINGS)


class ExplodingWrapper:
    @hookimpl(wrapper=True)
    def kmesh_endpoint_tiers(self) -> Generator[None, Any, Any]:
        yield
        raise ValueError("wrapper bug")


def test_a_raising_hook_wrapper_is_named(plugins: Plugins) -> None:
    plugins.register(Ranker(0), "ranker")
    plugins.register(ExplodingWrapper(), "exploding_wrapper")
    with pytest.raises(PluginError, match=r"^plugin 'exploding_wrapper': kmesh_endpoint_tiers "
                                          r"raised ValueError: wrapper bug$"):
        tiers(plugins)


def test_a_malformed_ranking_names_the_plugin_that_gave_it(plugins: Plugins) -> None:
    plugins.register(Ranker(0), "good")
    plugins.register(Ranker([0]), "short")  # one tier for two endpoints; asked first
    with pytest.raises(PluginError, match=r"^plugin 'short': kmesh_endpoint_tiers must return"):
        tiers(plugins)


def test_a_malformed_claim_names_the_plugin_among_several(plugins: Plugins) -> None:
    class Garbage:
        @hookimpl
        def kmesh_strategy_claim(self) -> object:
            return "PreferClose"

    class Fine:
        @hookimpl
        def kmesh_strategy_claim(self) -> Claim:
            return Claim(Strategy("Fine", Mode.FAILOVER), PRIORITY_THIRD_PARTY)

    plugins.register(Garbage(), "garbage")
    plugins.register(Fine(), "fine")
    with pytest.raises(PluginError, match=r"^plugin 'garbage': kmesh_strategy_claim returned "
                                          r"'PreferClose'"):
        plugins.claims(service(**LOCAL_AND_CLOSE), None, SETTINGS)


def test_a_plugin_cannot_be_registered_twice(plugins: Plugins) -> None:
    ranker = Ranker(0)
    plugins.register(ranker, "one")
    with pytest.raises(PluginError, match=r"'two'.*already registered as 'one'"):
        plugins.register(ranker, "two")
    assert plugins.names == ["local", "prefer_close", "one"]


# -- lifecycle notifications ---------------------------------------------------------------


class Stopping:
    def __init__(self, fail: bool) -> None:
        self.fail = fail
        self.told: list[str] = []

    @hookimpl
    def kmesh_agent_stopping(self, node: NodeInfo) -> None:
        self.told.append(node.name)
        if self.fail:
            raise RuntimeError("cannot stop")


class StoppingObserver:
    def __init__(self) -> None:
        self.calls = 0

    @hookimpl(wrapper=True)
    def kmesh_agent_stopping(self) -> Generator[None, Any, Any]:
        self.calls += 1
        return (yield)


def test_a_failing_lifecycle_plugin_does_not_stop_the_others(
    plugins: Plugins, caplog: pytest.LogCaptureFixture
) -> None:
    quiet, failing, observer = Stopping(False), Stopping(True), StoppingObserver()
    plugins.register(quiet, "quiet")
    plugins.register(failing, "failing")  # pluggy calls it first
    plugins.register(observer, "observer")
    with caplog.at_level(logging.ERROR):
        plugins.notify("kmesh_agent_stopping", node=CLIENT)
    assert failing.told == ["w1"] and quiet.told == ["w1"]
    assert observer.calls == 1  # one notification, through the plugin manager
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert [r.getMessage() for r in errors] == [
        "plugin failing failed in kmesh_agent_stopping: RuntimeError: cannot stop"
    ]
    assert errors[0].exc_info is not None


def test_a_failing_lifecycle_wrapper_is_logged_with_its_name(
    plugins: Plugins, caplog: pytest.LogCaptureFixture
) -> None:
    class BrokenObserver:
        @hookimpl(wrapper=True)
        def kmesh_agent_stopping(self) -> Generator[None, Any, Any]:
            yield
            raise RuntimeError("observer bug")

    quiet = Stopping(False)
    plugins.register(quiet, "quiet")
    plugins.register(BrokenObserver(), "broken_observer")
    with caplog.at_level(logging.ERROR):
        plugins.notify("kmesh_agent_stopping", node=CLIENT)
    assert quiet.told == ["w1"]
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR] == [
        "plugin broken_observer failed in kmesh_agent_stopping: RuntimeError: observer bug"
    ]
