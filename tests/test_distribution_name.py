"""The distribution name: free of the PyPI clash, the same everywhere it is written, and the one installed."""

import configparser
import re
from importlib import metadata

import tiny

SETUP_CFG = tiny.REPO_ROOT / "setup.cfg"
README = tiny.REPO_ROOT / "README.md"


def canonical(name):
    """PyPI's normalised form of a project name (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def distribution_name():
    config = configparser.ConfigParser()
    config.read(SETUP_CFG, encoding="utf-8")
    return config["metadata"]["name"]


def test_name_is_not_the_other_projects():
    # PyPI's `distil-trainer` (another project, which also installs an import package named distil_trainer) is what
    # `distil-trainer`, `distil_trainer` and `Distil.Trainer` all resolve to.
    name = distribution_name()
    assert canonical(name) != "distil-trainer"
    assert canonical(name) == "distil-trainer-hf"


def test_install_hints_name_this_distribution():
    """Every `pip install '<dist>[extra]'` hint in the code, the README and docs/ names this project's distribution."""
    name = distribution_name()
    files = [README, *sorted((tiny.REPO_ROOT / "docs").rglob("*.md")),
             *sorted((tiny.REPO_ROOT / "distil_trainer").rglob("*.py"))]
    hints = []
    for path in files:
        hints += re.findall(r"pip install[^\n]*?['\"]?([A-Za-z0-9_.-]+)\[[a-z0-9_,]+\]", path.read_text("utf-8"))
    # A wheel file's name starts with its distribution's name, "-" replaced by "_".
    hints = [h.split("-")[0] if h.endswith(".whl") else h for h in hints]
    project_hints = [h for h in hints if canonical(h).startswith("distil-trainer")]
    assert project_hints, "no install hint found: the README should say how to install the package"
    assert {canonical(h) for h in project_hints} == {canonical(name)}
    assert f"pip install {name}" in README.read_text("utf-8") or f'pip install "{name}' in README.read_text("utf-8")


def test_the_installed_distribution_provides_the_import_package():
    # `pip install -e .` (the README's set-up, CI's too) installs it under the new name, and nothing else in the
    # environment claims the `distil_trainer` import package (the other PyPI project would).
    # (The same distribution can be listed twice: its installed metadata and the egg-info a build leaves in the
    # checkout, which is on sys.path when tests run from the repository root.)
    assert metadata.version(distribution_name())
    providers = set(metadata.packages_distributions().get("distil_trainer", ()))
    assert providers == {distribution_name()}, (
        f"distil_trainer is provided by {sorted(providers)}: uninstall the others (pip uninstall distil-trainer "
        "removes the old name and the unrelated PyPI project alike), then pip install -e . again")
