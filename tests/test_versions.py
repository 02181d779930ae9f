"""Version floors: setup.cfg and the import-time check agree, and an older library fails at import in one line."""

import configparser
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from distil_trainer import versions

REPO = Path(__file__).resolve().parents[1]


def setup_cfg_floors():
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    lines = [*cfg["options"]["install_requires"].splitlines(), *cfg["options.extras_require"]["deepspeed"].splitlines()]
    floors = {}
    for line in lines:
        line = line.strip()
        if line and not line.startswith("#"):
            req = Requirement(line)
            floors[req.name] = {s.version for s in req.specifier if s.operator == ">="}
    return floors


def test_setup_cfg_floors_are_the_checked_ones():
    floors = setup_cfg_floors()
    for package, (floor, _) in {**versions.MINIMUM_VERSIONS, **versions.OPTIONAL_MINIMUM_VERSIONS}.items():
        assert floors[package] == {floor}, package


def test_the_transformers_floor_is_the_api_the_trainer_uses():
    from transformers import Trainer

    from distil_trainer import DistillationTrainer

    assert "loss_is_scaled_for_ga" in vars(Trainer)  # the attribute the floor exists for
    assert DistillationTrainer.loss_is_scaled_for_ga is True


@pytest.mark.parametrize("installed", ["5.19.0", "5.19.0.dev0", "5.24.1", "6.0.0"])
def test_floor_and_newer_pass(installed):
    assert versions.version_problem("transformers", installed, "5.19", "why") is None


@pytest.mark.parametrize("package,installed", [("transformers", "5.18.2"), ("transformers", "5.0.0"),
                                               ("accelerate", "1.5.2"), ("datasets", "3.6.0")])
def test_older_is_refused_in_one_line(monkeypatch, package, installed):
    real = versions.installed_version
    monkeypatch.setattr(versions, "installed_version", lambda p: installed if p == package else real(p))
    with pytest.raises(ImportError) as err:
        versions.check_versions()
    message = str(err.value)
    floor = versions.MINIMUM_VERSIONS[package][0]
    assert "\n" not in message
    assert f"{package}>={floor}" in message and f"{package} {installed} is installed" in message


def test_import_fails_with_an_old_transformers():
    # A fresh interpreter whose package metadata reports transformers 5.18.0: `import distil_trainer` must stop.
    code = ("import importlib.metadata as m\n"
            "real = m.version\n"
            "m.version = lambda p: '5.18.0' if p == 'transformers' else real(p)\n"
            "import distil_trainer\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: distil_trainer needs transformers>=5.19 (Trainer.loss_is_scaled_for_ga")
    assert "transformers 5.18.0 is installed" in last
