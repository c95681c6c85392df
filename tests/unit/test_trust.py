"""What the agent trusts on the node's filesystem (mounts.check_trusted) and what uninstall
removes from the build dir (build.remove_objects). Plain directories, no kernel: the bpffs and
agent-level cases are in tests/kernel/test_hygiene.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kmesh_plugin.datapath.build import remove_objects
from kmesh_plugin.datapath.mounts import check_trusted
from kmesh_plugin.errors import DatapathError

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the trusted owner is root")


def _dir(path: Path, mode: int) -> Path:
    path.mkdir()
    os.chmod(path, mode)
    return path


def test_a_missing_path_is_nothing_to_trust(tmp_path: Path) -> None:
    assert check_trusted(tmp_path / "absent", "pin dir") is False


def test_roots_own_directory_is_trusted(tmp_path: Path) -> None:
    assert check_trusted(_dir(tmp_path / "pins", 0o700), "pin dir") is True
    assert check_trusted(_dir(tmp_path / "cache", 0o755), "build dir") is True


@pytest.mark.parametrize("mode", [0o770, 0o707, 0o720, 0o702])
def test_a_directory_others_can_write_is_refused(tmp_path: Path, mode: int) -> None:
    path = _dir(tmp_path / "pins", mode)
    with pytest.raises(DatapathError) as exc:
        check_trusted(path, "pin dir")
    assert f"{path} (pin dir)" in str(exc.value) and f"mode {mode:04o}" in str(exc.value)
    assert "uid 0 (root)" in str(exc.value)


def test_another_owner_is_refused(tmp_path: Path) -> None:
    path = _dir(tmp_path / "cache", 0o700)
    os.chown(path, 65534, -1)
    with pytest.raises(DatapathError, match=r"owned by uid 65534.*not owned by root"):
        check_trusted(path, "build dir")


def test_a_symbolic_link_is_refused(tmp_path: Path) -> None:
    target = _dir(tmp_path / "real", 0o700)
    link = tmp_path / "pins"
    link.symlink_to(target)
    with pytest.raises(DatapathError, match="symbolic link"):
        check_trusted(link, "pin dir")


def test_a_directory_above_that_others_can_write_is_refused(tmp_path: Path) -> None:
    # Whoever can write the parent can rename the pin dir away and put their own in its place.
    parent = _dir(tmp_path / "open", 0o777)
    path = _dir(parent / "pins", 0o700)
    with pytest.raises(DatapathError) as exc:
        check_trusted(path, "pin dir")
    assert f"{parent} (a directory above pin dir {path})" in str(exc.value)
    # Sticky (as /tmp or bpffs's own 1777 root): others cannot touch what root owns there.
    os.chmod(parent, 0o1777)
    assert check_trusted(path, "pin dir") is True
    # Only the path itself when asked.
    os.chmod(parent, 0o777)
    assert check_trusted(path, "pin dir", ancestors=False) is True


def test_remove_objects_removes_only_ours(tmp_path: Path) -> None:
    build = _dir(tmp_path / "cache", 0o700)
    ours = ["kmesh_lb-0123456789abcdef.o", ".kmesh_lb-x1y2z3.o"]
    theirs = ["kmesh_lb.c", "other.o", "kmesh_lb-notes.txt"]
    for name in ours + theirs:
        (build / name).write_text(name)
    done = remove_objects(build)
    assert sorted(p.name for p in build.iterdir()) == sorted(theirs)
    assert sorted(done) == sorted(f"removed {build / n}" for n in ours)
    # Empty once the rest goes too: then the directory goes as well.
    for name in theirs:
        (build / name).unlink()
    (build / ours[0]).write_text("again")
    assert remove_objects(build) == [f"removed {build / ours[0]}", f"removed {build}"]
    assert not build.exists()
    assert remove_objects(build) == []
