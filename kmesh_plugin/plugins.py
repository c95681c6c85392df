"""Finding, registering and calling plugins (pluggy).

Plugins come from the entry-point group ``kmesh_plugin``, the built-ins included, and only the
ones named in plugin.toml ``[strategies] enabled`` are registered, in that order. Hooks are
called here and nowhere else, so a failing plugin is always named in the error.
"""

from __future__ import annotations

import importlib.metadata
import logging
from collections.abc import Sequence
from typing import Any

import pluggy

from kmesh_plugin import hookspecs
from kmesh_plugin.errors import KmeshError
from kmesh_plugin.hookspecs import ENTRY_POINT_GROUP, PROJECT, StrategySettings
from kmesh_plugin.model import Claim, EndpointInfo, Namespace, NodeInfo, Service, Strategy

log = logging.getLogger(__name__)


class PluginError(KmeshError):
    """A plugin could not be loaded, or a strategy hook returned something unusable."""


def installed_plugins() -> dict[str, importlib.metadata.EntryPoint]:
    """Entry points of group ``kmesh_plugin`` by name."""
    found: dict[str, importlib.metadata.EntryPoint] = {}
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in found and found[ep.name].value != ep.value:
            raise PluginError(
                f"two plugins are installed under the name {ep.name!r}: "
                f"{found[ep.name].value} and {ep.value}"
            )
        found[ep.name] = ep
    return found


class Plugins:
    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.order: list[str] = []  # registration order: breaks priority ties
        self._ties_warned: set[tuple[str, str, str, str]] = set()  # warn once per Service

    @classmethod
    def load(cls, enabled: Sequence[str]) -> Plugins:
        """Register the enabled plugins from their entry points, in the order given."""
        plugins = cls()
        available = installed_plugins()
        for name in enabled:
            ep = available.get(name)
            if ep is None:
                raise PluginError(
                    f"no plugin named {name!r} is installed in entry-point group "
                    f"{ENTRY_POINT_GROUP!r} (installed: {', '.join(sorted(available)) or 'none'})"
                )
            try:
                module = ep.load()
            except Exception as e:  # a broken plugin must name itself
                raise PluginError(f"plugin {name!r} ({ep.value}) failed to import: {e}") from e
            plugins.register(module, name)
        return plugins

    def register(self, plugin: object, name: str) -> None:
        try:
            self.pm.register(plugin, name=name)
        except pluggy.PluginValidationError as e:
            raise PluginError(f"plugin {name!r} does not fit the hook specs: {e}") from e
        self.order.append(name)

    @property
    def names(self) -> list[str]:
        return list(self.order)

    # -- strategy hooks ---------------------------------------------------------------------

    def claims(
        self, service: Service, namespace: Namespace | None, settings: StrategySettings
    ) -> list[Claim]:
        """Every claim for ``service``, the winner first (highest priority, then first
        registered)."""
        kwargs = {"service": service, "namespace": namespace, "settings": settings}
        found: list[tuple[int, int, Claim]] = []
        for impl in self.pm.hook.kmesh_strategy_claim.get_hookimpls():
            result = _call(impl, kwargs)
            if result is None:
                continue
            if not isinstance(result, Claim) or not isinstance(result.strategy, Strategy):
                raise PluginError(
                    f"plugin {impl.plugin_name!r}: kmesh_strategy_claim returned {result!r}, "
                    "expected a Claim or None"
                )
            claim = Claim(result.strategy, result.priority, result.warning, impl.plugin_name)
            found.append((-claim.priority, self._rank(impl.plugin_name), claim))
        found.sort(key=lambda t: (t[0], t[1]))
        if len(found) > 1 and found[0][0] == found[1][0]:
            first, second = found[0][2], found[1][2]
            tie = (service.namespace, service.name, first.plugin, second.plugin)
            if tie in self._ties_warned:
                return [c for _, _, c in found]
            self._ties_warned.add(tie)
            log.warning(
                "plugins %s and %s both claim Service %s/%s with priority %d; %s, registered "
                "first, wins", first.plugin, second.plugin, service.namespace, service.name,
                first.priority, first.plugin,
                extra={"service": f"{service.namespace}/{service.name}"},
            )
        return [c for _, _, c in found]

    def endpoint_tiers(
        self,
        strategy: Strategy,
        client: NodeInfo,
        service: Service,
        endpoints: Sequence[EndpointInfo],
    ) -> tuple[list[int | None], str] | None:
        """The first plugin's ranking and its name, or None when no plugin ranks this."""
        kwargs = {
            "strategy": strategy, "client": client, "service": service, "endpoints": endpoints
        }
        for impl in reversed(self.pm.hook.kmesh_endpoint_tiers.get_hookimpls()):
            result = _call(impl, kwargs)
            if result is None:
                continue
            tiers = list(result)
            if len(tiers) != len(endpoints) or not all(
                t is None or (isinstance(t, int) and 0 <= t < 8) for t in tiers
            ):
                raise PluginError(
                    f"plugin {impl.plugin_name!r}: kmesh_endpoint_tiers must return one tier "
                    f"(0..7) or None per endpoint; got {result!r} for {len(endpoints)} endpoints"
                )
            return tiers, impl.plugin_name
        return None

    # -- notifications ----------------------------------------------------------------------

    def notify(self, hook_name: str, **kwargs: Any) -> None:
        """Call a lifecycle hook on every plugin; a failing plugin is logged, not fatal."""
        for impl in reversed(getattr(self.pm.hook, hook_name).get_hookimpls()):
            try:
                _call(impl, kwargs)
            except Exception:
                log.exception("plugin %s failed in %s", impl.plugin_name, hook_name,
                              extra={"plugin": impl.plugin_name, "hook": hook_name})

    def _rank(self, name: str) -> int:
        return self.order.index(name) if name in self.order else len(self.order)


def _call(impl: Any, kwargs: dict[str, Any]) -> Any:
    # Pass only the arguments the implementation names, as pluggy does.
    return impl.function(**{arg: kwargs[arg] for arg in impl.argnames})
