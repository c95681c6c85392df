"""The Local strategy: ``spec.internalTrafficPolicy: Local`` keeps traffic on the client's node.

Strict: only endpoints on the same node are eligible; with none, the connect is refused at
once. It wins over every trafficDistribution setting (SPEC.md section 4), hence its priority.
"""

from __future__ import annotations

from kmesh_plugin import hookimpl
from kmesh_plugin.hookspecs import PRIORITY_LOCAL
from kmesh_plugin.model import Claim, Mode, Scope, Service, Strategy


@hookimpl
def kmesh_strategy_claim(service: Service) -> Claim | None:
    if service.internal_traffic_policy != "Local":
        return None
    strategy = Strategy(
        "Local", Mode.STRICT, (Scope.NODE,), reason="spec.internalTrafficPolicy: Local"
    )
    return Claim(strategy, PRIORITY_LOCAL)
