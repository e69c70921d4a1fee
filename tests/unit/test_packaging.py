"""pyproject.toml's claims that CI keeps true: the versions CI pins (.ci/constraints.txt) lie within the
declared bounds and are what .ci/run installs, the installed versions lie within them too, and the
license is the SPDX expression that setuptools >= 77 reads without a deprecation warning."""

from __future__ import annotations

import tomllib
from importlib.metadata import version
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
DEPENDENCIES = {canonicalize_name(r.name): r for r in map(Requirement, PYPROJECT["project"]["dependencies"])}


def pins() -> dict[str, str]:
    lines = (line.split("#")[0].strip() for line in (ROOT / ".ci" / "constraints.txt").read_text().splitlines())
    return {canonicalize_name(name): pinned for name, pinned in (line.split("==") for line in lines if line)}


def test_ci_pins_lie_within_the_declared_bounds_and_ci_installs_them():
    pinned = pins()
    assert {"torch", "transformers", "diffusers", "torchao", "ray"} <= set(pinned)
    for name, pinned_version in pinned.items():
        assert name in DEPENDENCIES, f"{name} is pinned for CI but not a dependency"
        assert DEPENDENCIES[name].specifier.contains(pinned_version), (name, pinned_version)
    ci = (ROOT / ".ci" / "run").read_text()
    assert "-c .ci/constraints.txt -e \".[dev]\"" in ci
    assert f"torch=={pinned['torch']}" in ci  # the CPU build first, the pinned one


def test_the_installed_versions_lie_within_the_declared_bounds():
    for name, requirement in DEPENDENCIES.items():
        installed = version(name).split("+")[0]  # torch's local tag (+cpu) is no part of the bound
        assert SpecifierSet(str(requirement.specifier)).contains(installed, prereleases=True), (name, installed)


def test_the_license_is_an_spdx_expression_for_setuptools_77():
    assert PYPROJECT["project"]["license"] == "Apache-2.0"
    requires = [Requirement(r) for r in PYPROJECT["build-system"]["requires"]]
    setuptools = next(r for r in requires if r.name == "setuptools")
    assert not setuptools.specifier.contains("76.9") and setuptools.specifier.contains("77.0")
