"""Reproducible builds: the locks in requirements/ pin everything pyproject.toml asks for, on every
platform it supports, and the image, ./dev and CI install from them (the image without pgserver
and without dev tools).

``./dev lock`` writes both locks from one resolution (``uv pip compile --universal``): ``dev.txt``
with the extras, ``runtime.txt`` constrained to the same pins without them.
"""

from __future__ import annotations

import re
import shlex
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
EXTRAS: dict[str, list[str]] = PROJECT["optional-dependencies"]
ENVIRONMENTS = [
    {"python_version": f"3.{minor}", "python_full_version": f"3.{minor}.{patch}", "sys_platform": platform,
     "platform_system": system, "os_name": os_name, "implementation_name": "cpython",
     "platform_python_implementation": "CPython", "platform_machine": machine}
    for minor, patch in ((11, 7), (12, 3), (13, 1), (14, 0))
    for platform, system, os_name, machine in (("linux", "Linux", "posix", "x86_64"),
                                               ("darwin", "Darwin", "posix", "arm64"),
                                               ("win32", "Windows", "nt", "AMD64"))
]
"""Where Atrium may be installed (requires-python >= 3.11): the lock must hold there too."""


@dataclass(frozen=True)
class Pin:
    name: str
    version: Version
    marker: Marker | None
    hashes: int


def read_lock(name: str) -> dict[str, list[Pin]]:
    """The pins of ``requirements/<name>`` by package (a package may be pinned under several markers)."""
    text = (ROOT / "requirements" / name).read_text()
    pins: dict[str, list[Pin]] = {}
    for entry in re.split(r"\n(?=\S)", text):
        if entry.startswith("#") or not entry.strip():
            continue
        requirement, *options = entry.replace("\\\n", " ").split("\n")[0].split(" --hash=")
        parsed = Requirement(requirement.strip())
        (spec,) = parsed.specifier
        assert spec.operator == "==", f"{name}: {requirement} is not an exact pin"
        pins.setdefault(canonicalize_name(parsed.name), []).append(
            Pin(parsed.name, Version(spec.version), parsed.marker, len(options)))
    return pins


DEV, RUNTIME = read_lock("dev.txt"), read_lock("runtime.txt")


def pin_in(lock: dict[str, list[Pin]], name: str, environment: dict[str, str]) -> Pin | None:
    found = [p for p in lock.get(canonicalize_name(name), []) if p.marker is None or p.marker.evaluate(environment)]
    assert len(found) <= 1, f"{name} is pinned twice for {environment}"
    return found[0] if found else None


def requirements(*groups: str) -> list[tuple[str, Requirement]]:
    found = [("dependencies", Requirement(r)) for r in PROJECT["dependencies"]]
    return found + [(group, Requirement(r)) for group in groups for r in EXTRAS[group]]


@pytest.mark.parametrize(("lock", "groups"), [("dev.txt", tuple(EXTRAS)), ("runtime.txt", ())])
def test_the_lock_pins_every_dependency_within_its_range(lock: str, groups: tuple[str, ...]) -> None:
    """Every requirement of pyproject.toml (with the extras, for dev.txt) is pinned wherever its marker
    holds, to a version its range allows: a dependency added or a range moved without ``./dev lock``
    fails here."""
    pins = DEV if lock == "dev.txt" else RUNTIME
    for environment in ENVIRONMENTS:
        for group, requirement in requirements(*groups):
            context = {**environment, "extra": group if group != "dependencies" else ""}
            if requirement.marker is not None and not requirement.marker.evaluate(context):
                continue
            pin = pin_in(pins, requirement.name, environment)
            where = f"Python {environment['python_full_version']} on {environment['sys_platform']}"
            assert pin is not None, f"{lock} has no {requirement.name} for {where}: run ./dev lock"
            assert requirement.specifier.contains(pin.version, prereleases=True), \
                f"{lock} pins {pin.name}=={pin.version}, outside {requirement}: run ./dev lock"


def test_every_pin_is_hashed_and_both_locks_agree() -> None:
    for lock in (DEV, RUNTIME):
        for pins in lock.values():
            assert all(p.hashes > 0 for p in pins), pins  # pip --require-hashes installs nothing unhashed
    for name, pins in RUNTIME.items():
        assert {(p.version, str(p.marker)) for p in pins} <= {(p.version, str(p.marker)) for p in DEV[name]}, \
            f"runtime.txt and dev.txt pin {name} differently: run ./dev lock"


def test_the_runtime_lock_carries_no_embedded_postgres_and_no_dev_tools() -> None:
    runtime_names = {canonicalize_name(Requirement(r).name) for r in PROJECT["dependencies"]}
    for group, listed in EXTRAS.items():
        for raw in listed:
            name = canonicalize_name(Requirement(raw).name)
            if name in runtime_names:
                continue
            text = (ROOT / "requirements" / "runtime.txt").read_text()
            via = re.search(rf"^{re.escape(name)}==.*?(?=^\S)", text, re.S | re.M)
            # Only as a dependency of a runtime package (uvicorn[standard] brings websockets), never by itself.
            assert via is None or "atrium-crm" not in via.group(0), f"{name} ({group}) is in the runtime lock"
    for tool in ("pgserver", "pytest", "pytest-asyncio", "ruff", "mypy", "import-linter", "uv", "hypothesis",
                 "kubernetes-validate"):
        assert tool not in RUNTIME, tool
    assert "pgserver" in DEV and all(p.marker is not None for p in DEV["pgserver"])  # no wheels past 3.12


def test_pgserver_is_an_extra_that_dev_installs() -> None:
    assert not any(Requirement(r).name == "pgserver" for r in PROJECT["dependencies"])
    assert [Requirement(r).name for r in EXTRAS["embedded"]] == ["pgserver"]


def run_lines(text: str) -> list[list[str]]:
    """The commands a Dockerfile's RUN instructions or a shell script run (continuations joined)."""
    joined = text.replace("\\\n", " ")
    return [shlex.split(line.strip().removeprefix("RUN "), comments=True) for line in joined.splitlines()
            if line.strip() and not line.strip().startswith("#")]


def pip_installs(text: str) -> list[list[str]]:
    return [words for words in run_lines(text) if "pip" in " ".join(words[:4]) and "install" in words]


def test_the_image_installs_the_runtime_lock_only() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    installs = pip_installs(dockerfile)
    assert len(installs) == 1, installs
    (install,) = installs
    assert "--require-hashes" in install and "--no-deps" in install
    assert install[install.index("-r") + 1] == "/tmp/runtime.txt"
    copies = [words for words in run_lines(dockerfile) if words[0] == "COPY"]
    assert ["COPY", "requirements/runtime.txt", "/tmp/runtime.txt"] in copies
    assert not any(path in words for words in copies for path in ("pyproject.toml", "requirements/dev.txt", "tests"))


def test_dev_and_ci_install_from_the_dev_lock() -> None:
    dev = (ROOT / "dev").read_text()
    installs = pip_installs(dev)
    locked = [words for words in installs if "-r" in words]
    assert locked and all(w[w.index("-r") + 1] == "requirements/dev.txt" and "--require-hashes" in w for w in locked)
    project = [words for words in installs if "-e" in words]
    assert project and all("--no-deps" in w for w in project), "the project itself adds no unlocked dependency"
    assert "./dev test" in (ROOT / ".ci" / "run").read_text()  # CI installs through ./dev
    assert "pip install" not in (ROOT / ".ci" / "run").read_text()
    for lock in ("dev.txt", "runtime.txt"):
        header = (ROOT / "requirements" / lock).read_text().splitlines()[:2]
        assert header[1].strip() == "#    ./dev lock", f"requirements/{lock} is written by ./dev lock"
