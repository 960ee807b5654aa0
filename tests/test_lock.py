"""requirements.lock (`make lock`) satisfies pyproject.toml: it pins every dependency of the
project and of its extras (dev, demo, and the cluster nodes' aws and gcp), torch aside, at a
version the specifier allows, and so the dependencies of the extras asked for
(`ray[default,train,tune]`, `moto[server]`)."""

import re
from importlib import metadata
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).parent.parent
LOCK = (ROOT / "requirements.lock").read_text()
PINS = {
    canonicalize_name(name): version for name, version in re.findall(r"^(\S+)==(\S+)$", LOCK, re.M)
}
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
EXTRAS = PROJECT["optional-dependencies"]
REQUIREMENTS = [
    req
    for req in map(Requirement, PROJECT["dependencies"] + [r for e in EXTRAS.values() for r in e])
    if req.name != "torch"
]


def locked(name: str) -> str | None:
    return PINS.get(canonicalize_name(name))


def unmet(requirements: list[Requirement]) -> list[str]:
    """The requirements that the lock leaves out or pins at a version they exclude."""
    return [
        f"{req} (locked: {locked(req.name)})"
        for req in requirements
        if locked(req.name) is None
        or not req.specifier.contains(locked(req.name), prereleases=True)
    ]


def test_header_names_python_3_11():
    header = re.match(r"(#.*\n)+", LOCK)[0]
    assert "Python 3.11" in header


def test_torch_and_its_cuda_wheels_left_out():
    assert [name for name in PINS if re.match(r"torch$|triton$|nvidia-|cuda-", name)] == []


def test_pyproject_dependencies_locked_at_allowed_versions():
    assert unmet(REQUIREMENTS) == []


def test_dependencies_of_requested_extras_locked():
    """Read from the installed metadata, the locked version's once `make` has installed the lock."""
    for req in (req for req in REQUIREMENTS if req.extras):
        dist = metadata.distribution(req.name)
        assert dist.version == locked(req.name), (
            f"{req.name} {dist.version} installed: make install"
        )
        needs = [
            need
            for need in map(Requirement, dist.requires)
            if need.marker is None or any(need.marker.evaluate({"extra": e}) for e in req.extras)
        ]
        assert unmet(needs) == [], req.name
