"""The serving install is locked with hashes: ``requirements.lock`` (``make lock``,
pip-compile --generate-hashes over pyproject's ``[project].dependencies``) pins every
package, direct and transitive, with ``==`` and at least one sha256; it satisfies
pyproject's ranges, holds no training dependency, and is what the runtime image installs
(``pip install --require-hashes -r requirements.lock``), so the image and ``make audit``
(``pip-audit -r requirements.lock``) describe the same bytes."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements.lock"


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


def test_the_image_installs_the_lock_by_its_hashes() -> None:
    """The serving venv is built from the lock in hash-checking mode, before the project
    itself is installed without dependencies (nothing unlocked can slip in)."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    runs = [line for line in dockerfile.splitlines() if line.startswith("RUN pip install")]
    lock_install = [r for r in runs if "requirements.lock" in r]
    assert len(lock_install) == 1, runs
    assert "--require-hashes" in lock_install[0] and "--only-binary=:all:" in lock_install[0]
    assert "COPY requirements.lock " in dockerfile
    assert "!requirements.lock" in (ROOT / ".dockerignore").read_text()
    project_install = [r for r in runs if r.startswith("RUN pip install --no-deps .")]
    assert len(project_install) == 1, "the project must be installed with --no-deps"
    assert dockerfile.index(lock_install[0]) < dockerfile.index(project_install[0])
