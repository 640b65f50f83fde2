"""The repository is self-contained and its dependency set is pinned: constraints.txt pins every
dependency pyproject.toml declares (within its ranges), .ci/run and the README install with it,
and nothing in the tests, code or README reaches outside the repository."""
from __future__ import annotations

import re
import tomllib

from packaging.requirements import Requirement
from packaging.version import Version

from helpers import REPO


def pins() -> dict[str, Version]:
    out = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            out[name.lower().replace("_", "-")] = Version(version)
    return out


def declared() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in ("test", "demo"):
        reqs += project["optional-dependencies"][extra]
    return [Requirement(r) for r in reqs]


def test_constraints_pin_every_declared_dependency_within_its_range():
    pinned = pins()
    for req in declared():
        name = req.name.lower().replace("_", "-")
        assert name in pinned, f"{req.name} is not pinned in constraints.txt"
        assert req.specifier.contains(pinned[name], prereleases=True), (str(req), str(pinned[name]))
    assert pinned["torch"] == Version("2.13.0")  # the CPU wheel this machine class serves


def test_ci_and_readme_install_with_the_constraints():
    ci = (REPO / ".ci" / "run").read_text()
    installs = [ln for ln in ci.splitlines() if "pip install" in ln and "-e" in ln.split()]
    assert installs and all("-c constraints.txt" in ln for ln in installs)
    readme = (REPO / "README.md").read_text()
    assert re.search(r"pip install[^\n]*-c constraints\.txt[^\n]*-e", readme)


def test_nothing_reaches_outside_the_repository():
    texts = [p for p in REPO.rglob("*") if p.suffix in (".py", ".md", ".yaml", ".sh", ".toml")
             and ".git" not in p.parts and "bench" not in p.parts and p.name != "test_packaging.py"]
    for path in texts:
        text = path.read_text(encoding="utf-8", errors="replace")
        assert "../shared" not in text and "parents[2]" not in text, path
    assert not (REPO / "features.npy").exists()
