"""Compile bpf/kmesh_lb.c with clang, once per (source, capacities) pair.

Map capacities are compile-time constants of the object (bpftool 7.1 cannot resize a map at
load time), so the object is built for the capacities in plugin.toml and cached under a name
that hashes the sources and the flags. Several agents may build at once (the lab starts three):
each compiles to a private temporary file and renames it into place.

The agent loads a cached object as it finds it, so the build dir and the object are trusted only
when root owns them and nobody else can write them (mounts.check_trusted); a build dir the agent
creates is 0700. Every object of ours is named ``kmesh_lb-<hash>.o`` (``.kmesh_lb-*.o`` while
being compiled): `kmesh-plugin uninstall` removes those and nothing else (:func:`remove_objects`).
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path

from kmesh_plugin.datapath import records
from kmesh_plugin.datapath.mounts import check_trusted
from kmesh_plugin.errors import DatapathError

SOURCE_NAME = "kmesh_lb.c"
OBJECT_GLOBS = ("kmesh_lb-*.o", ".kmesh_lb-*.o")  # built objects, and compiles cut short


@dataclass(frozen=True)
class Capacities:
    max_services: int
    max_endpoints: int

    @property
    def frontend_lines(self) -> int:
        return records.frontend_lines(self.max_services)

    def defines(self) -> list[str]:
        return [
            f"-DKMESH_MAX_SERVICES={self.max_services}",
            f"-DKMESH_MAX_ENDPOINTS={self.max_endpoints}",
            f"-DKMESH_FRONTEND_LINES={self.frontend_lines}",
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


@functools.cache
def multiarch_include() -> list[str]:
    """Debian keeps asm/ headers under /usr/include/<multiarch>, which BPF C needs."""
    try:
        triple = subprocess.run(
            ["gcc", "-print-multiarch"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        triple = ""
    return [f"-I/usr/include/{triple}"] if triple else []


def _flags(capacities: Capacities, defines: tuple[str, ...]) -> tuple[Path, list[str]]:
    src = source_dir()
    return src, [
        "-O2", "-g", "-target", "bpf", "-Wall", "-Werror",
        *multiarch_include(), f"-I{src}", *capacities.defines(), *(f"-D{d}" for d in defines),
    ]


def object_path(capacities: Capacities, build_dir: Path, defines: tuple[str, ...] = ()) -> Path:
    """Where the object for ``capacities`` is cached (whether or not it is built yet)."""
    src, flags = _flags(capacities, defines)
    digest = hashlib.sha256()
    for path in sorted(src.glob("*.[ch]")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    digest.update(" ".join(flags).encode())
    return build_dir / f"kmesh_lb-{digest.hexdigest()[:16]}.o"


def check_build(capacities: Capacities, build_dir: Path, defines: tuple[str, ...] = ()) -> Path:
    """Refuse a build dir or a cached object that root does not own alone (DatapathError
    naming the path, its owner and mode); returns the object's path."""
    target = object_path(capacities, build_dir, defines)
    if check_trusted(build_dir, "build dir"):
        check_trusted(target, "compiled object", ancestors=False)
    return target


def compile_object(capacities: Capacities, build_dir: Path, clang: str = "clang",
                   defines: tuple[str, ...] = ()) -> Path:
    """Return the path of an object built for ``capacities``, compiling it if needed.

    ``defines`` are extra ``NAME=VALUE`` macros: the product passes none; tests build variants
    with them (``KMESH_TEST_*``, see bpf/kmesh_lb.c). A build dir or cached object that is not
    root's alone is refused (see the module docstring)."""
    src, flags = _flags(capacities, defines)
    target = check_build(capacities, build_dir, defines)
    if target.is_file():
        return target

    compiler = shutil.which(clang)
    if compiler is None:
        raise DatapathError(f"{clang} not found on PATH: apt install clang (datapath.clang)")
    build_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    check_trusted(build_dir, "build dir")
    fd, tmp = tempfile.mkstemp(dir=build_dir, prefix=".kmesh_lb-", suffix=".o")
    os.close(fd)
    try:
        proc = subprocess.run(
            [compiler, *flags, "-c", str(src / SOURCE_NAME), "-o", tmp],
            capture_output=True, text=True, check=False,
        )
        if proc.returncode != 0:
            raise DatapathError(f"clang failed on {src / SOURCE_NAME}:\n{proc.stderr.strip()}")
        os.chmod(tmp, 0o644)  # whatever the umask: a cached object must pass check_build
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def remove_objects(build_dir: Path) -> list[str]:
    """Remove every object of ours from ``build_dir`` (``kmesh_lb-*.o``, and compiles cut
    short), and the directory itself if that leaves it empty. Returns what it did."""
    done: list[str] = []
    if not build_dir.is_dir():
        return done
    check_trusted(build_dir, "build dir")
    for pattern in OBJECT_GLOBS:
        for path in sorted(build_dir.glob(pattern)):
            if path.is_symlink() or path.is_file():
                path.unlink()
                done.append(f"removed {path}")
    try:
        build_dir.rmdir()
    except OSError:  # not empty: what else is there is not ours
        pass
    else:
        done.append(f"removed {build_dir}")
    return done
