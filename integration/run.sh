#!/usr/bin/env bash
# Set up this machine for kmesh-plugin and run one of its jobs. Run as root.
#
#   integration/run.sh setup     install what is missing (apt + a venv in .venv), nothing else
#   integration/run.sh seed      set up, then run the seed experiment in the lab
#   integration/run.sh test      set up, then lint and run every test (kernel and lab included)
#   integration/run.sh bench     set up, then run every benchmark (README "Performance")
#
# Extra arguments go to the job: `run.sh seed --local`, `run.sh test -k lab -x`.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${KMESH_VENV:-$ROOT/.venv}
APT_PACKAGES=(clang bpftool libbpf-dev iproute2 containernetworking-plugins gcc python3-venv
              iptables nftables conntrack openssl util-linux podman runc busybox-static curl)

if [[ $(id -u) -ne 0 ]]; then
    echo "run.sh: needs root (eBPF programs, cgroups, network namespaces)" >&2
    exit 1
fi

apt_missing() {
    local missing=()
    command -v clang >/dev/null || missing+=(clang)
    command -v bpftool >/dev/null || missing+=(bpftool)
    [[ -f /usr/include/bpf/bpf_helpers.h ]] || missing+=(libbpf-dev)
    command -v ip >/dev/null || missing+=(iproute2)
    [[ -x /usr/lib/cni/bridge && -x /usr/lib/cni/host-local ]] || missing+=(containernetworking-plugins)
    command -v gcc >/dev/null || missing+=(gcc)
    python3 -c 'import ensurepip, venv' 2>/dev/null || missing+=(python3-venv)
    command -v iptables-legacy-restore >/dev/null || missing+=(iptables)
    command -v nft >/dev/null || missing+=(nftables)
    command -v conntrack >/dev/null || missing+=(conntrack)
    command -v openssl >/dev/null || missing+=(openssl)  # the lab API server's TLS certificate
    command -v setpriv >/dev/null || missing+=(util-linux)  # deploy/measure_caps.py
    command -v curl >/dev/null || missing+=(curl)  # what the seed's `kubectl exec` runs in a pod
    # integration/tests/test_podman.py: a real CNI runtime (podman's CNI backend; runc, since
    # crun refuses the hybrid cgroup layout) and the static busybox its offline image is made of.
    command -v podman >/dev/null || missing+=(podman)
    command -v runc >/dev/null || missing+=(runc)
    dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q 'ok installed' \
        || missing+=(busybox-static)
    echo "${missing[@]}"
}

setup() {
    if [[ -n "$(apt_missing)" ]]; then
        echo "run.sh: apt-get install ${APT_PACKAGES[*]}"
        apt-get update -q
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
            "${APT_PACKAGES[@]}"
    fi
    # The venv is rebuilt only when a pyproject changed since the last install.
    local stamp="$VENV/.kmesh-installed"
    local want
    want=$(cat "$ROOT/pyproject.toml" "$ROOT"/hooks/*/pyproject.toml "$ROOT/integration/pyproject.toml" \
        | sha256sum | cut -d' ' -f1)
    if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
        python3 -m venv "$VENV"
        "$VENV/bin/pip" install -q --upgrade pip
        "$VENV/bin/pip" install -q -e "$ROOT[test]" -e "$ROOT/hooks/prefer_close" \
            -e "$ROOT/hooks/local" -e "$ROOT/integration[bench]"
        echo "$want" > "$stamp"
    fi
}

job=${1:-}
shift || true
case "$job" in
    setup)
        setup
        ;;
    seed)
        setup
        exec "$VENV/bin/kmesh-plugin" lab seed "$@"
        ;;
    test)
        setup
        cd "$ROOT"
        "$VENV/bin/ruff" check .
        exec "$VENV/bin/python" -m pytest "$@"
        ;;
    bench)
        setup
        cd "$ROOT"
        exec "$VENV/bin/python" -m kmesh_lab.bench "$@"
        ;;
    *)
        sed -n '2,9p' "$0" >&2
        exit 2
        ;;
esac
