"""kube-proxy's two netfilter datapaths, written the way kube-proxy writes them, as baselines.

* **iptables mode** (pkg/proxy/iptables): in the nat table, OUTPUT jumps to KUBE-SERVICES,
  which holds one rule per Service port (match ClusterIP, protocol, port -> KUBE-SVC-<hash>);
  each KUBE-SVC chain marks off-cluster sources for masquerade and picks an endpoint chain
  (statistic random for more than one), and each KUBE-SEP chain DNATs to its endpoint. The last
  KUBE-SERVICES rule sends local destinations to KUBE-NODEPORTS. A new connection walks
  KUBE-SERVICES rule by rule: the cost grows with the number of Services.
* **nftables mode** (pkg/proxy/nftables): in table ``ip kube-proxy`` a verdict map keyed by
  ClusterIP . protocol . port jumps straight to the service chain: one hash lookup whatever
  the number of Services; then numgen picks an endpoint chain that DNATs.

Both are loaded in one transaction (iptables-restore, nft -f) into a network namespace that
only the benchmark's client uses, so their conntrack and rule walk cost only that client.
Chain names follow kube-proxy's scheme: a prefix and the first 16 base32 characters of a
SHA-256 over the service port's name and protocol (endpoint chains: over the endpoint too).
"""

from __future__ import annotations

import base64
import hashlib
import subprocess
from dataclasses import dataclass

from kmesh_lab import netns, procs

CLUSTER_CIDR = "198.18.0.0/16"  # pod addresses: traffic from elsewhere gets masqueraded


@dataclass(frozen=True)
class ServicePort:
    namespace: str
    name: str
    port_name: str
    cluster_ip: str
    port: int
    endpoints: tuple[tuple[str, int], ...]
    protocol: str = "tcp"

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}:{self.port_name}"


def _hash(*parts: str) -> str:
    digest = hashlib.sha256("".join(parts).encode()).digest()
    return base64.b32encode(digest).decode()[:16]


def svc_chain(sp: ServicePort) -> str:
    return "KUBE-SVC-" + _hash(sp.ref, sp.protocol)


def sep_chain(sp: ServicePort, ip: str, port: int) -> str:
    return "KUBE-SEP-" + _hash(sp.ref, sp.protocol, f"{ip}:{port}")


def iptables_restore(services: list[ServicePort]) -> str:
    """The nat table as `iptables-restore` takes it."""
    chains = ["KUBE-SERVICES", "KUBE-POSTROUTING", "KUBE-MARK-MASQ", "KUBE-NODEPORTS"]
    rules = [
        '-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
        '-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING',
        "-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000",
        "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN",
        "-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000",
        '-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" '
        "-j MASQUERADE --random-fully",
    ]
    for sp in services:
        svc = svc_chain(sp)
        chains.append(svc)
        comment = f'"{sp.ref} cluster IP"'
        rules.append(f"-A KUBE-SERVICES -d {sp.cluster_ip}/32 -p {sp.protocol} -m comment "
                     f"--comment {comment} -m {sp.protocol} --dport {sp.port} -j {svc}")
        rules.append(f"-A {svc} ! -s {CLUSTER_CIDR} -d {sp.cluster_ip}/32 -p {sp.protocol} "
                     f"-m comment --comment {comment} -m {sp.protocol} --dport {sp.port} "
                     "-j KUBE-MARK-MASQ")
        n = len(sp.endpoints)
        for i, (ip, port) in enumerate(sp.endpoints):
            sep = sep_chain(sp, ip, port)
            chains.append(sep)
            pick = (f"-m statistic --mode random --probability {1 / (n - i):.11f} "
                    if i < n - 1 else "")
            rules.append(f'-A {svc} -m comment --comment "{sp.ref} -> {ip}:{port}" {pick}'
                         f"-j {sep}")
            rules.append(f'-A {sep} -s {ip}/32 -m comment --comment "{sp.ref}" -j KUBE-MARK-MASQ')
            rules.append(f'-A {sep} -p {sp.protocol} -m comment --comment "{sp.ref}" '
                         f"-m {sp.protocol} -j DNAT --to-destination {ip}:{port}")
    rules.append('-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: '
                 'this must be the last rule in this chain" -m addrtype --dst-type LOCAL '
                 "-j KUBE-NODEPORTS")
    lines = ["*nat", *(f":{c} - [0:0]" for c in chains), *rules, "COMMIT", ""]
    return "\n".join(lines)


def nft_ruleset(services: list[ServicePort], numgen_for: set[str] | None = None) -> str:
    """Table ``ip kube-proxy`` as `nft -f` takes it.

    kube-proxy picks the endpoint with ``numgen random mod N vmap {...}``, an anonymous map
    per Service. nft 1.0.6 (Debian 12) loads n anonymous maps in O(n^2) time (2,500: 1.1 s,
    5,000: 7.7 s, 20,000: 142 s on the benchmark machine), so ``numgen_for`` can restrict
    them to the Services that are measured; the others jump straight to their only endpoint.
    A connection to a measured Service walks exactly kube-proxy's chains either way.
    """
    elements = []
    chains = []
    for sp in services:
        svc = "service-" + _hash(sp.ref, sp.protocol)
        elements.append(f"{sp.cluster_ip} . {sp.protocol} . {sp.port} : goto {svc}")
        picks = []
        for i, (ip, port) in enumerate(sp.endpoints):
            ep = "endpoint-" + _hash(sp.ref, sp.protocol, f"{ip}:{port}")
            picks.append(f"{i} : goto {ep}")
            chains.append(f"  chain {ep} {{\n    ip saddr {ip} jump mark-for-masquerade\n"
                          f"    meta l4proto {sp.protocol} dnat to {ip}:{port}\n  }}")
        if numgen_for is None or sp.ref in numgen_for or len(picks) > 1:
            pick = f"numgen random mod {len(sp.endpoints)} vmap {{ {', '.join(picks)} }}"
        else:
            pick = "goto " + picks[0].split(": goto ", 1)[1]
        chains.append(
            f"  chain {svc} {{\n"
            f"    ip daddr {sp.cluster_ip} {sp.protocol} dport {sp.port} "
            f"ip saddr != {CLUSTER_CIDR} jump mark-for-masquerade\n"
            f"    {pick}\n  }}"
        )
    element_list = ",\n      ".join(elements)
    return f"""table ip kube-proxy {{
  chain mark-for-masquerade {{
    meta mark set meta mark or 0x4000
  }}
  chain masquerading {{
    type nat hook postrouting priority srcnat; policy accept;
    meta mark & 0x4000 == 0 return
    meta mark set meta mark xor 0x4000
    masquerade fully-random
  }}
  map service-ips {{
    type ipv4_addr . inet_proto . inet_service : verdict
    comment "ClusterIP, ExternalIP and LoadBalancer IP traffic"
    elements = {{
      {element_list}
    }}
  }}
  chain services {{
    ip daddr . meta l4proto . th dport vmap @service-ips
  }}
  chain nat-output {{
    type nat hook output priority -100; policy accept;
    jump services
  }}
{chr(10).join(chains)}
}}
"""


def load(netns_name: str, tool: list[str], ruleset: str) -> None:
    """Run ``tool`` (iptables-restore, nft -f -) inside the namespace with ``ruleset`` on stdin."""
    proc = procs.spawn(tool, netns=netns.path(netns_name), cgroup=None, stdin=subprocess.PIPE,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate(ruleset.encode(), timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(tool)} in {netns_name}: exit {proc.returncode}: "
                           f"{err.decode(errors='replace')[-2000:]}")
    del out


# The x_tables (legacy) backend: kube-proxy's iptables mode on hosts whose iptables is legacy.
# Debian's default iptables-nft loads 10,000 such Services in 16.6 s and did not finish 100,000
# in 5 minutes here; iptables-legacy-restore takes 0.7 s and 28 s. Rules evaluate the same way:
# one rule after the other.
IPTABLES_RESTORE = "iptables-legacy-restore"


def load_iptables(netns_name: str, services: list[ServicePort]) -> None:
    """Replace the nat table (previous Services included) with these Services."""
    load(netns_name, [IPTABLES_RESTORE], iptables_restore(services))


def load_nft(netns_name: str, services: list[ServicePort],
             numgen_for: set[str] | None = None) -> None:
    load(netns_name, ["nft", "-f", "-"], "flush ruleset\n" + nft_ruleset(services, numgen_for))
