"""Every import path the shipped files name as a string loads, through the loader that will read it.

serve_config.yaml and rayservice.yaml's serveConfigV2 name the application (`import_path`) and an
autoscaling policy (`policy_function`); pyproject.toml names console scripts. Moving a module breaks
none of them silently: the paths are read from the files themselves, so one added there is checked too.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterator
from importlib.metadata import EntryPoint

import pytest
import yaml

from tests.deploy.test_shipped_configs import ROOT


def _walk(node: object, where: str) -> Iterator[tuple[str, str, object]]:
    """(where, key, value) for every mapping entry below `node`."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield where, key, value
            yield from _walk(value, f"{where}.{key}")
    elif isinstance(node, list):
        for index, item in enumerate(node):
            yield from _walk(item, f"{where}[{index}]")


def _serve_configs() -> dict[str, dict]:
    rayservice = yaml.safe_load((ROOT / "rayservice.yaml").read_text())
    return {
        "serve_config.yaml": yaml.safe_load((ROOT / "serve_config.yaml").read_text()),
        "rayservice.yaml:serveConfigV2": yaml.safe_load(rayservice["spec"]["serveConfigV2"]),
    }


def _named(key: str) -> list[tuple[str, object]]:
    return [(f"{name}{where}", value) for name, config in _serve_configs().items()
            for where, found, value in _walk(config, "") if found == key]


APPLICATIONS = _named("import_path")
POLICIES = _named("policy")
SCRIPTS = sorted(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"].items())


def test_the_files_name_what_this_module_loads():
    """Each file is read (a renamed key would leave its paths unchecked, not failing)."""
    assert {where.split(".")[0].split(":")[0] for where, _ in APPLICATIONS + POLICIES} == {
        "serve_config", "rayservice"}
    assert len(APPLICATIONS) == 2 and len(POLICIES) >= 2 and SCRIPTS


@pytest.mark.parametrize(("where", "path"), APPLICATIONS, ids=[w for w, _ in APPLICATIONS])
def test_application_import_path_loads(where, path):
    from ray._common.utils import import_attr  # what `serve run` / `serve deploy` call on it

    assert callable(import_attr(path)), f"{where}: {path}"


@pytest.mark.parametrize(("where", "policy"), POLICIES, ids=[w for w, _ in POLICIES])
def test_autoscaling_policy_loads_and_takes_its_kwargs(where, policy):
    """Serve's AutoscalingPolicy imports the path when the config is parsed; the class is then built
    with the config's `policy_kwargs`, as the controller builds it."""
    from ray.serve.config import AutoscalingPolicy

    loaded = AutoscalingPolicy(**policy).get_policy()
    assert loaded.__module__ + ":" + loaded.__qualname__ == policy["policy_function"], where
    if isinstance(loaded, type):
        loaded(**policy.get("policy_kwargs", {}))


@pytest.mark.parametrize(("name", "value"), SCRIPTS, ids=[n for n, _ in SCRIPTS])
def test_console_script_loads(name, value):
    """pip writes a console script that imports `value` as an entry point; this is that import."""
    assert callable(EntryPoint(name=name, value=value, group="console_scripts").load())
