"""Compile bpf/kmesh_lb.c with clang, once per (source, capacities) pair.

Map capacities are compile-time constants of the object (bpftool 7.1 cannot resize a map at
load time), so the object is built for the capacities in plugin.toml and cached under a name
that hashes the sources and the flags. Several agents may build at once (the lab starts three):
each compiles to a private temporary file and renames it into place.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path

from kmesh_plugin.errors import DatapathError

SOURCE_NAME = "kmesh_lb.c"


@dataclass(frozen=True)
class Capacities:
    max_services: int
    max_endpoints: int

    def defines(self) -> list[str]:
        return [
            f"-DKMESH_MAX_SERVICES={self.max_services}",
            f"-DKMESH_MAX_ENDPOINTS={self.max_endpoints}",
        ]


def source_dir() -> Path:
    """The bpf/ directory: beside the package in a checkout, under share/ once installed."""
    candidates = [
        Path(__file__).resolve().parents[2] / "bpf",
        Path(sys.prefix) / "share" / "kmesh-plugin" / "bpf",
        Path(sysconfig.get_path("data")) / "share" / "kmesh-plugin" / "bpf",
    ]
    for candidate in candidates:
        if (candidate / SOURCE_NAME).is_file():
            return candidate
    raise DatapathError(
        f"cannot find {SOURCE_NAME}; looked in " + ", ".join(str(c) for c in candidates)
    )


def multiarch_include() -> list[str]:
    """Debian keeps asm/ headers under /usr/include/<multiarch>, which BPF C needs."""
    try:
        triple = subprocess.run(
            ["gcc", "-print-multiarch"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        triple = ""
    return [f"-I/usr/include/{triple}"] if triple else []


def compile_object(capacities: Capacities, build_dir: Path, clang: str = "clang",
                   defines: tuple[str, ...] = ()) -> Path:
    """Return the path of an object built for ``capacities``, compiling it if needed.

    ``defines`` are extra ``NAME=VALUE`` macros: the product passes none; tests build variants
    with them (``KMESH_TEST_*``, see bpf/kmesh_lb.c)."""
    src = source_dir()
    flags = [
        "-O2", "-g", "-target", "bpf", "-Wall", "-Werror",
        *multiarch_include(), f"-I{src}", *capacities.defines(), *(f"-D{d}" for d in defines),
    ]
    digest = hashlib.sha256()
    for path in sorted(src.glob("*.[ch]")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    digest.update(" ".join(flags).encode())
    target = build_dir / f"kmesh_lb-{digest.hexdigest()[:16]}.o"
    if target.is_file():
        return target

    compiler = shutil.which(clang)
    if compiler is None:
        raise DatapathError(f"{clang} not found on PATH: apt install clang (datapath.clang)")
    build_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=build_dir, prefix=".kmesh_lb-", suffix=".o")
    os.close(fd)
    try:
        proc = subprocess.run(
            [compiler, *flags, "-c", str(src / SOURCE_NAME), "-o", tmp],
            capture_output=True, text=True, check=False,
        )
        if proc.returncode != 0:
            raise DatapathError(f"clang failed on {src / SOURCE_NAME}:\n{proc.stderr.strip()}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target
