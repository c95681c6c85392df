"""Finding, registering and calling plugins (pluggy).

Plugins come from the entry-point group ``kmesh_plugin``, the built-ins included, and only the
ones named in plugin.toml ``[strategies] enabled`` are registered, in that order. Hooks are
called here and nowhere else.

**Every hook goes through the plugin manager**, one ``pm.hook.<name>(...)`` call per question,
so hook wrappers (``@hookimpl(wrapper=True)``), ``pm.enable_tracing()``,
``pm.add_hookcall_monitoring()``, tryfirst/trylast and ``firstresult`` behave exactly as pluggy
defines them: a wrapper of ``kmesh_strategy_claim`` sees (and may change) the whole claim list,
one of ``kmesh_endpoint_tiers`` sees the single answer that ended the call.

**Attribution.** pluggy's results do not say which implementation gave them, yet the core names
the plugin behind every claim (``explain``, tie warnings), behind the ranking it used, and behind
every bad answer. So each plugin is registered behind a *recording shim*: an object carrying the
plugin's own hook implementations (same attribute names, markers and signatures, so pluggy
validates, orders and calls them as it would the plugin's) that call the plugin's function and,
for the two strategy hooks, note ``(plugin, answer)`` for the call in progress. Each answer pluggy
hands back is matched *by identity* to those notes. An answer no implementation gave came from a
hook wrapper and is attributed to the wrapper plugin(s) of that hook.

Why not one subset HookCaller per plugin (``pm.subset_hook_caller``)? It attributes too, but asks
each plugin in a call of its own: a wrapper would never see the claim list whole, monitoring would
count a call per plugin, and ``kmesh_endpoint_tiers``'s single firstresult answer would still
arrive without its source unless the core re-implemented firstresult over the subsets.

The shims' costs: ``pm.get_plugin(name)`` returns the shim (its ``plugin`` attribute is the
plugin); each implementation call runs one more (small) frame; a plugin registered with
``pm.register`` directly, bypassing ``Plugins.register``, is not recorded, so its answers are
attributed like a wrapper's (to every unrecorded implementation of the hook).

**Failures.** An exception from a strategy hook becomes a ``PluginError`` naming the plugin, with
the exception as its cause. pluggy does not say who raised, so the plugin is the owner of the
innermost traceback frame that runs a registered implementation (a wrapper's included): the one
that raised, even from a helper it called. Lifecycle hooks are notifications: the shim logs an
implementation's exception with the plugin's name and returns None, so the call goes on to the
other plugins (pluggy ends a call at the first exception). The price: a hook wrapper sees such a
notification complete normally. A failing lifecycle wrapper is logged with its name too; one
that fails before its ``yield`` keeps the implementations from running, as pluggy defines.
"""

from __future__ import annotations

import functools
import importlib.metadata
import inspect
import logging
import traceback
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from types import CodeType, FrameType
from typing import Any

import pluggy

from kmesh_plugin import hookspecs
from kmesh_plugin.errors import KmeshError
from kmesh_plugin.hookspecs import ENTRY_POINT_GROUP, PROJECT, StrategySettings
from kmesh_plugin.model import Claim, EndpointInfo, Namespace, NodeInfo, Service, Strategy

log = logging.getLogger(__name__)

CLAIM = "kmesh_strategy_claim"
TIERS = "kmesh_endpoint_tiers"
_STRATEGY_HOOKS = frozenset({CLAIM, TIERS})

# The (plugin, answer) notes of the strategy hook call in progress (see the module docstring).
_answers: ContextVar[list[tuple[str, object]] | None] = ContextVar("kmesh_answers", default=None)


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


class _Shim:
    """What pluggy registers for one plugin: the plugin's hook implementations, recorded."""

    def __init__(self, plugin: object, plugin_name: str) -> None:
        self.plugin = plugin
        self.plugin_name = plugin_name

    def __repr__(self) -> str:
        return f"<plugin {self.plugin_name!r}: {self.plugin!r}>"


def _recorded(function: Callable[..., Any], plugin_name: str, hook_name: str) -> Any:
    """``function`` as the shim offers it to pluggy (``functools.wraps`` keeps its signature,
    which pluggy reads through ``__wrapped__`` to pass the arguments it names)."""
    if hook_name in _STRATEGY_HOOKS:

        @functools.wraps(function)
        def strategy_hook(*args: Any, **kwargs: Any) -> Any:
            answer = function(*args, **kwargs)
            if answer is not None:
                notes = _answers.get()
                if notes is not None:
                    notes.append((plugin_name, answer))
            return answer

        return strategy_hook

    @functools.wraps(function)
    def lifecycle_hook(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except Exception as e:  # a notification must reach the other plugins
            log.exception("plugin %s failed in %s: %s: %s", plugin_name, hook_name,
                          type(e).__name__, e, extra={"plugin": plugin_name, "hook": hook_name})
            return None

    return lifecycle_hook


def _code_of(function: Callable[..., Any]) -> tuple[CodeType, object] | None:
    """The code an implementation runs, and the object it is bound to (None when unbound)."""
    function = inspect.unwrap(function)
    bound_to = getattr(function, "__self__", None)
    code = getattr(getattr(function, "__func__", function), "__code__", None)
    return None if code is None else (code, bound_to)


class Plugins:
    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.order: list[str] = []  # registration order: breaks priority ties
        self._rank_of: dict[str, int] = {}
        self._shims: dict[str, _Shim] = {}
        # For blame: the code of every registered implementation -> (bound object, plugin).
        # Instances of one plugin class share the code; the bound object tells them apart.
        self._owners: dict[CodeType, list[tuple[object, str]]] = {}
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
        for other, shim in self._shims.items():
            if shim.plugin is plugin:
                raise PluginError(f"plugin {name!r}: this object is already registered as "
                                  f"{other!r}")
        shim = _Shim(plugin, name)
        owners: list[tuple[CodeType, object]] = []
        marker = f"{PROJECT}_impl"
        for attr in dir(plugin):
            opts = self.pm.parse_hookimpl_opts(plugin, attr)
            if opts is None:
                continue
            if hasattr(shim, attr):
                raise PluginError(f"plugin {name!r}: a hook implementation may not be named "
                                  f"{attr!r}")
            function = getattr(plugin, attr)
            owned = _code_of(function)
            if owned is not None:
                owners.append(owned)
            if opts.get("wrapper") or opts.get("hookwrapper"):
                setattr(shim, attr, function)  # wrappers answer nothing of their own
                continue
            recorded = _recorded(function, name, opts.get("specname") or attr)
            setattr(recorded, marker, opts)
            setattr(shim, attr, recorded)
        try:
            self.pm.register(shim, name=name)
        except pluggy.PluginValidationError as e:
            raise PluginError(f"plugin {name!r} does not fit the hook specs: {e}") from e
        except ValueError as e:  # pluggy: the name is taken
            raise PluginError(f"plugin {name!r} cannot be registered: {e}") from e
        self._shims[name] = shim
        for code, bound_to in owners:
            self._owners.setdefault(code, []).append((bound_to, name))
        self._rank_of[name] = len(self.order)
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
        results, notes = self._ask(
            CLAIM, {"service": service, "namespace": namespace, "settings": settings}
        )
        if not isinstance(results, list):
            raise PluginError(
                f"plugin {self._unrecorded(CLAIM)!r}: {CLAIM} hook wrapper returned "
                f"{results!r}, expected the list of claims"
            )
        found: list[tuple[int, int, Claim]] = []
        taken: set[int] = set()
        for result in results:
            if result is None:
                continue
            plugin = self._source(CLAIM, result, notes, taken)
            if not isinstance(result, Claim) or not isinstance(result.strategy, Strategy):
                raise PluginError(
                    f"plugin {plugin!r}: {CLAIM} returned {result!r}, expected a Claim or None"
                )
            claim = Claim(result.strategy, result.priority, result.warning, plugin)
            found.append((-claim.priority, self._rank(plugin), claim))
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
        """The first answering plugin's ranking and its name, or None when none ranks this."""
        if not self.pm.hook.kmesh_endpoint_tiers.get_hookimpls():
            # Nobody implements the hook, so nobody can observe the call either: skip it
            # (it is asked once per service group; on a full sync that is 10,000 calls).
            return None
        answer, notes = self._ask(
            TIERS,
            {"strategy": strategy, "client": client, "service": service, "endpoints": endpoints},
        )
        if answer is None:
            return None
        plugin = self._source(TIERS, answer, notes, set())
        try:
            tiers = list(answer)
        except TypeError:
            tiers = None
        if tiers is None or len(tiers) != len(endpoints) or not all(
            t is None or (isinstance(t, int) and 0 <= t < 8) for t in tiers
        ):
            raise PluginError(
                f"plugin {plugin!r}: {TIERS} must return one tier (0..7) or None per "
                f"endpoint; got {answer!r} for {len(endpoints)} endpoints"
            )
        return tiers, plugin

    # -- notifications ----------------------------------------------------------------------

    def notify(self, hook_name: str, **kwargs: Any) -> None:
        """Call a lifecycle hook on every plugin; a failing plugin is logged, not fatal."""
        try:
            getattr(self.pm.hook, hook_name)(**kwargs)
        except Exception as e:  # only a wrapper gets here: the shims contain the rest
            plugin = self._blame(e) or "?"
            log.exception("plugin %s failed in %s: %s: %s", plugin, hook_name,
                          type(e).__name__, e, extra={"plugin": plugin, "hook": hook_name})

    # -- attribution ------------------------------------------------------------------------

    def _ask(self, hook_name: str, kwargs: dict[str, Any]) -> tuple[Any, list[tuple[str, object]]]:
        """One call of a strategy hook through the plugin manager, with its answers' notes."""
        notes: list[tuple[str, object]] = []
        token = _answers.set(notes)
        try:
            return getattr(self.pm.hook, hook_name)(**kwargs), notes
        except Exception as e:
            plugin = self._blame(e)
            where = f"plugin {plugin!r}: " if plugin else ""
            raise PluginError(f"{where}{hook_name} raised {type(e).__name__}: {e}") from e
        finally:
            _answers.reset(token)

    def _source(
        self, hook_name: str, answer: object, notes: list[tuple[str, object]], taken: set[int]
    ) -> str:
        """The plugin that gave ``answer``: the first note of that very object not yet taken."""
        for i, (plugin, noted) in enumerate(notes):
            if noted is answer and i not in taken:
                taken.add(i)
                return plugin
        return self._unrecorded(hook_name)

    def _unrecorded(self, hook_name: str) -> str:
        """Who can hand back an answer no shim noted: the hook's wrappers (and implementations
        registered around ``Plugins.register``)."""
        names = dict.fromkeys(
            impl.plugin_name
            for impl in getattr(self.pm.hook, hook_name).get_hookimpls()
            if impl.wrapper or impl.hookwrapper or not isinstance(impl.plugin, _Shim)
        )
        return " or ".join(names) or "?"

    def _blame(self, error: BaseException) -> str | None:
        """The plugin whose implementation is the innermost frame of ``error``'s traceback
        (or of the exceptions it came from)."""
        seen: set[int] = set()
        current: BaseException | None = error
        while current is not None and id(current) not in seen:
            seen.add(id(current))
            owner = None
            for frame, _ in traceback.walk_tb(current.__traceback__):
                owner = self._owner(frame) or owner
            if owner is not None:
                return owner
            current = current.__cause__ or current.__context__
        return None

    def _owner(self, frame: FrameType) -> str | None:
        owners = self._owners.get(frame.f_code)
        if not owners:
            return None
        if len(owners) == 1:
            return owners[0][1]
        # A method's first argument is the object it runs for.
        code = frame.f_code
        bound_to = frame.f_locals.get(code.co_varnames[0]) if code.co_argcount else None
        names = [name for obj, name in owners if obj is bound_to]
        return " or ".join(names or [name for _, name in owners])

    def _rank(self, name: str) -> int:
        return self._rank_of.get(name, len(self.order))
