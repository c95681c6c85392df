"""Fuzzing the scenario files and the map codecs (hypothesis).

Scenario files: whatever the bytes, `kmesh-plugin lab run` either runs or exits with a
ScenarioError that names the file and the key; never a traceback. Map codecs: decoding any
bytes a map could hold gives a value or a ValueError that names the struct, nothing else.
(plugin.toml and manifests are fuzzed in test_hostile_input.py; garbage in the real kernel
maps in tests/kernel/test_hygiene.py.) The CI profile is short; HYPOTHESIS_PROFILE=fuzz runs
at least 10,000 inputs per surface.
"""

from __future__ import annotations

import os
import string
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kmesh_lab import scenario
from kmesh_lab.scenario import ScenarioError
from kmesh_plugin.datapath import records

settings.register_profile("ci", max_examples=40, deadline=None, database=None,
                          suppress_health_check=[HealthCheck.too_slow,
                                                 HealthCheck.data_too_large])
settings.register_profile("fuzz", max_examples=10_000, deadline=None, database=None,
                          suppress_health_check=[HealthCheck.too_slow,
                                                 HealthCheck.data_too_large])
PROFILE = settings.get_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

SCALARS = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(10**30),
                                                           max_value=10**30),
                    st.floats(allow_nan=True), st.text(max_size=20))
KEYS = st.sampled_from(["nodes", "steps", "strategies", "plugin_paths", "apply", "label",
                        "delete", "request", "expect", "from", "url", "count", "namespace",
                        "title", "restart_agent", "explain", "metrics", "node", "labels",
                        "kind", "name", "versions", "all_seen", "min_share", "refused",
                        "family", "signal", "service", "deployment", "pod"]) | st.text(
    alphabet=string.ascii_letters, max_size=8)
JSONISH = st.recursive(SCALARS, lambda children: st.lists(children, max_size=4)
                       | st.dictionaries(KEYS, children, max_size=5), max_leaves=30)


def scenario_like() -> st.SearchStrategy[Any]:
    """Mostly well-formed scenarios with fields replaced by anything: the parser's deep
    paths get exercised, not only its first check."""
    good_step = st.one_of(
        st.fixed_dictionaries({"apply": st.text(max_size=40)}),
        st.fixed_dictionaries({"label": st.fixed_dictionaries(
            {"node": st.text(max_size=5), "labels": st.dictionaries(st.text(max_size=5),
                                                                    SCALARS, max_size=3)})}),
        st.fixed_dictionaries({"request": st.fixed_dictionaries(
            {"from": st.dictionaries(KEYS, SCALARS, max_size=3), "url": st.text(max_size=10),
             "count": SCALARS}), "expect": st.dictionaries(KEYS, JSONISH, max_size=3)}),
        st.dictionaries(KEYS, JSONISH, max_size=3),
    )
    return st.one_of(
        JSONISH,
        st.fixed_dictionaries({"nodes": st.dictionaries(st.text(max_size=8),
                                                        st.one_of(st.none(), JSONISH),
                                                        max_size=3),
                               "steps": st.lists(good_step, max_size=4)}),
    )


def _names_the_culprit(message: str, path: Path) -> None:
    assert message.startswith(f"{path}: "), message
    assert "\n" not in message.strip() or "YAML" in message, message


@PROFILE
@given(raw=scenario_like())
def test_any_scenario_structure_is_parsed_or_refused_with_its_key(raw: Any) -> None:
    path = Path("/tmp/fuzz.yaml")
    try:
        scenario.parse(raw, path)
    except ScenarioError as e:
        _names_the_culprit(str(e), path)


@PROFILE
@given(data=st.one_of(st.binary(max_size=300),
                      scenario_like().map(lambda r: yaml.safe_dump(r).encode())))
def test_any_scenario_file_is_loaded_or_refused_with_the_file_named(
    data: bytes, tmp_path_factory: Any
) -> None:
    path = tmp_path_factory.mktemp("scenario") / "s.yaml"
    path.write_bytes(data)
    try:
        scenario.load(path)
    except ScenarioError as e:
        _names_the_culprit(str(e), path)


@PROFILE
@given(data=st.binary(max_size=120))
def test_every_map_codec_decodes_any_bytes_or_names_its_struct(data: bytes) -> None:
    for layout in records.ALL_LAYOUTS:
        try:
            layout.unpack(data)
        except ValueError as e:
            assert layout.c_name in str(e)
    for decode in (records.Frontend.unpack, records.Backend.unpack):
        try:
            value = decode(data)
        except ValueError as e:
            assert "kmesh_" in str(e)
        else:
            str(value)  # what dump prints must not fail either


def test_the_hostile_scenario_files_of_the_review() -> None:
    """The concrete cases: not UTF-8, a directory, deep nesting, an alias bomb."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        cases = {
            "not-utf8.yaml": b"nodes: {a: {}}\nsteps: [{title: \xff\xfe}]\n",
            "deep.yaml": b"nodes: " + b"[" * 5000 + b"]" * 5000,
            "bomb.yaml": b'a: &a ["x","x","x","x","x","x","x","x","x"]\n' + b"".join(
                f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},"
                f"*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},"
                f"*{chr(97 + i)}]\n".encode() for i in range(8)),
            "int.yaml": b"nodes: {a: {}}\nsteps: [{request: {from: {namespace: s, pod: p}, "
                        b"url: u, count: " + b"9" * 5000 + b"}}]\n",
        }
        (root / "dir.yaml").mkdir()
        for name, data in cases.items():
            (root / name).write_bytes(data)
        for name in [*cases, "dir.yaml"]:
            path = root / name
            try:
                scenario.load(path)
            except ScenarioError as e:
                _names_the_culprit(str(e), path)
            else:
                raise AssertionError(f"{name} was accepted")
