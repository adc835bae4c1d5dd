"""requirements.lock / requirements-dev.lock must stay in step with pyproject.toml.

Regenerate them with `make lock` (tools/lock_deps.py) after changing dependencies.
"""

from __future__ import annotations

import sys
from functools import cache
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


@cache
def parse_lock(path: Path) -> dict[str, Requirement]:
    pins: dict[str, Requirement] = {}
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        assert not line.startswith("-"), f"{path.name}:{number}: pip options do not belong in the lock: {raw!r}"
        req = Requirement(line)  # raises InvalidRequirement on a malformed line
        name = canonicalize_name(req.name)
        assert name not in pins, f"{path.name}:{number}: {name} is pinned twice"
        specs = list(req.specifier)
        assert len(specs) == 1 and specs[0].operator == "==" and "*" not in specs[0].version, (
            f"{path.name}:{number}: {raw!r} is not an exact pin (name==version)"
        )
        assert not req.url and not req.extras and req.marker is None, f"{path.name}:{number}: plain pins only: {raw!r}"
        pins[name] = req
    return pins


RUNTIME_LOCK = ROOT / "requirements.lock"
DEV_LOCK = ROOT / "requirements-dev.lock"


def pinned(req: Requirement) -> Version:
    return Version(next(iter(req.specifier)).version)


@pytest.mark.parametrize("path", [RUNTIME_LOCK, DEV_LOCK], ids=lambda p: p.name)
def test_lock_parses_and_pins_exactly(path):
    assert parse_lock(path), f"{path.name} pins nothing"


@pytest.mark.parametrize(
    ("path", "declared"),
    [
        (RUNTIME_LOCK, PROJECT["dependencies"]),
        (DEV_LOCK, PROJECT["dependencies"] + PROJECT["optional-dependencies"]["dev"]),
    ],
    ids=["requirements.lock", "requirements-dev.lock"],
)
def test_lock_covers_and_satisfies_pyproject(path, declared):
    lock = parse_lock(path)
    for line in declared:
        req = Requirement(line)
        name = canonicalize_name(req.name)
        assert name in lock, f"{req} is declared in pyproject.toml but not pinned: run `make lock`"
        version = pinned(lock[name])
        assert req.specifier.contains(version, prereleases=True), (
            f"pyproject.toml wants {req}, the lock pins {version}: run `make install && make lock`"
        )


def test_dev_lock_extends_runtime_lock():
    runtime, dev = parse_lock(RUNTIME_LOCK), parse_lock(DEV_LOCK)
    for name, req in runtime.items():
        assert name in dev, f"{name} is in requirements.lock but not in requirements-dev.lock"
        assert pinned(dev[name]) == pinned(req), f"{name}: the two lock files pin different versions"
    assert canonicalize_name(PROJECT["name"]) not in dev, "the project itself must not be pinned"


def test_lock_is_closed_over_installed_metadata():
    """Every requirement of a locked package is locked too (checked where the installed version is the pinned one)."""
    roots = [Requirement(r) for r in PROJECT["dependencies"]]
    extras = {canonicalize_name(r.name): {canonicalize_name(e) for e in r.extras} for r in roots}
    runtime = parse_lock(RUNTIME_LOCK)
    checked = 0
    for name, req in runtime.items():
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        if Version(Version(dist.version).public) != pinned(req):
            continue  # environment differs from the lock (e.g. a newer install): nothing to compare
        checked += 1
        wanted = {""} | extras.get(name, set())
        for line in dist.requires or []:
            sub = Requirement(line)
            if sub.marker is not None and not any(sub.marker.evaluate({"extra": e}) for e in wanted):
                continue
            assert canonicalize_name(sub.name) in runtime, (
                f"{name} {dist.version} requires {sub}, which requirements.lock does not pin: run `make lock`"
            )
    if not checked:
        pytest.skip("no locked package is installed at its pinned version")
