"""A fresh machine: no folder of the repository shadows an installed distribution when Python runs
from the repository root (as `python -m pytest` and the README do), and the package still imports.

transformers 5.25 imports Hugging Face's `kernels` package; while `kernels/` held an `__init__.py`,
`python -m pytest` from the root imported the project's folder in its place and every test module
that loads the model failed to collect.
"""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import ROOT

FOLDERS = sorted(p.name for p in ROOT.iterdir()
                 if p.is_dir() and not p.name.startswith((".", "_")) and p.name.isidentifier() and p.name != "blip3v")


def run_in_root(code: str, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "PYTHONNOUSERSITE": "1"}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)


def test_the_design_folders_are_all_checked():
    assert {"export", "runtime", "kernels", "calibration", "tests", "benchmarks"} <= set(FOLDERS)


@pytest.mark.parametrize("name", FOLDERS)
def test_no_folder_shadows_an_installed_package(name, tmp_path):
    """An installed distribution named like each folder wins over the folder."""
    site = tmp_path / "site"
    (site / name).mkdir(parents=True)
    (site / name / "__init__.py").write_text("WHO = 'installed'\n")
    proc = run_in_root(f"import {name}; print({name}.WHO)", pythonpath=site)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "installed"


def test_import_kernels_from_the_root_is_hugging_faces():
    """The case that broke: transformers >= 5.25 depends on `kernels`."""
    try:
        import kernels  # noqa: F401
    except ImportError:
        pytest.skip("Hugging Face's kernels package is not installed here")
    codes = ["import kernels; print(kernels.__file__)",
             "import transformers.models.phi3.modeling_phi3, blip3v.kernels.rmsnorm; print('ok')"]
    with ThreadPoolExecutor(2) as pool:  # independent interpreters: side by side on the two cores
        which, both = pool.map(run_in_root, codes)
    assert which.returncode == 0, which.stderr
    assert not which.stdout.strip().startswith(str(ROOT / "kernels")), which.stdout
    assert both.returncode == 0, both.stderr


def test_subpackages_import_from_anywhere(tmp_path):
    """From the root and from elsewhere, the design folders import as blip3v's subpackages."""
    code = ("import blip3v.runtime.manifest, blip3v.export.graphs, blip3v.kernels.rmsnorm, blip3v.calibration.graph, "
            "blip3v.data.synth, blip3v.model.config, blip3v.benchmarks.common; print(blip3v.runtime.manifest.__name__)")

    def run_from(cwd: Path) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120)

    with ThreadPoolExecutor(2) as pool:  # independent interpreters: side by side on the two cores
        procs = list(pool.map(run_from, (ROOT, tmp_path)))
    for proc in procs:
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == "blip3v.runtime.manifest"
