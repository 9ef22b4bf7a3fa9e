"""The serving install is locked with hashes: ``requirements.lock`` (``make lock``,
pip-compile --generate-hashes over pyproject's ``[project].dependencies``) pins every
package, direct and transitive, with ``==`` and at least one sha256; it satisfies
pyproject's ranges, holds no training dependency, and pins exactly what the runtime image
installs (``deploy/docker/requirements.txt``), so the image, the lock and ``make audit``
(``pip-audit -r requirements.lock``) all describe the same bytes."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements.lock"
IMAGE_PINS = ROOT / "deploy" / "docker" / "requirements.txt"


def _lock_entries() -> dict[str, tuple[Requirement, list[str]]]:
    """name -> (requirement, its hashes), from the pip-compile format (continued lines)."""
    text = LOCK.read_text().replace("\\\n", " ")
    entries: dict[str, tuple[Requirement, list[str]]] = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        spec, *options = line.split(" --")
        requirement = Requirement(spec.strip())
        hashes = [o.strip().removeprefix("hash=sha256:") for o in options if o.startswith("hash=")]
        entries[canonicalize_name(requirement.name)] = (requirement, hashes)
    return entries


def _pinned_version(requirement: Requirement) -> str:
    (specifier,) = requirement.specifier
    assert specifier.operator == "==", f"{requirement} is not pinned with =="
    return specifier.version


def test_every_locked_package_is_pinned_with_a_sha256() -> None:
    entries = _lock_entries()
    assert len(entries) >= 9
    for name, (requirement, hashes) in entries.items():
        _pinned_version(requirement)
        assert hashes, f"{name} has no --hash"
        assert all(re.fullmatch(r"[0-9a-f]{64}", h) for h in hashes), name


def test_the_lock_satisfies_pyproject_and_holds_no_training_dependency() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    entries = _lock_entries()
    for spec in project["dependencies"]:
        wanted = Requirement(spec)
        locked = entries.get(canonicalize_name(wanted.name))
        assert locked is not None, f"{wanted.name} (pyproject) is not in requirements.lock"
        version = _pinned_version(locked[0])
        assert wanted.specifier.contains(version), f"{locked[0]} does not satisfy {wanted}"
    for name in ("torch", "onnx", "onnxscript"):
        assert name not in entries, f"{name} belongs to the train extra, not the serving lock"


def test_the_lock_pins_what_the_runtime_image_installs() -> None:
    image = {}
    for line in IMAGE_PINS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            requirement = Requirement(line)
            image[canonicalize_name(requirement.name)] = _pinned_version(requirement)
    locked = {name: _pinned_version(r) for name, (r, _) in _lock_entries().items()}
    assert locked == image, "regenerate one from the other (make lock; see the image file)"
