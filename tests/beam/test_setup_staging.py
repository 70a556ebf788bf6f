"""``--setup_file ./setup.py``: what Dataflow stages holds the packages its workers import.

Beam's stager builds the workflow tarball with ``python -m build --sdist`` when ``build`` is
installed and with ``python setup.py sdist`` otherwise; each worker then ``pip install``s
it. The test runs that same staging code on a copy of the source tree (nothing is written
into the repository), checks that the tarball holds every module and data file of ``beam``,
``muse_tf`` and ``serving``, installs it offline and imports the pipeline from the install.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("beam", "muse_tf", "serving")
#: Non-Python files the packages need at run time (``package_data`` in setup.py).
DATA_SUFFIXES = {"serving": (".config", ".txt", ".yaml", ".yml")}
TOP_LEVEL = ("setup.py", "pyproject.toml", "README.md", "MANIFEST.in")


def _package_files() -> set[str]:
    """Every module and data file of the packages in the working tree (relative paths)."""
    files = set()
    for package in PACKAGES:
        for directory, subdirs, names in os.walk(ROOT / package):
            subdirs[:] = [d for d in subdirs if d != "__pycache__"]
            for name in names:
                if name.endswith(".py") or name.endswith(DATA_SUFFIXES.get(package, ())):
                    files.add(str((Path(directory) / name).relative_to(ROOT)))
    return files


@pytest.fixture(scope="module")
def staged(tmp_path_factory) -> Path:
    source = tmp_path_factory.mktemp("source")
    for name in TOP_LEVEL:
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, source / name)
    for package in PACKAGES:
        shutil.copytree(ROOT / package, source / package,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp_path_factory.mktemp("staged")
    script = ("import sys\n"
              "from apache_beam.runners.portability.stager import Stager\n"
              "print(Stager._build_setup_package(sys.argv[1], sys.argv[2]))\n")
    done = subprocess.run([sys.executable, "-c", script, str(source / "setup.py"), str(out)],
                          capture_output=True, text=True, timeout=300, cwd=source)
    assert done.returncode == 0, done.stderr[-3000:]
    return Path(done.stdout.strip().splitlines()[-1])


def test_setup_declares_the_three_packages():
    text = (ROOT / "setup.py").read_text()
    for package in PACKAGES:
        assert f'"{package}"' in text and f'"{package}.*"' in text, package


@pytest.mark.slow
def test_staged_tarball_holds_every_module_of_the_packages(staged):
    assert staged.name.endswith(".tar.gz"), staged
    with tarfile.open(staged) as tar:
        names = tar.getnames()
    prefix = names[0].split("/")[0] + "/"
    members = {n[len(prefix):] for n in names if n.startswith(prefix)}
    missing = sorted(_package_files() - members)
    assert not missing, f"not staged for Dataflow workers: {missing}"
    for package in PACKAGES:
        assert f"{package}/__init__.py" in members
    top_level = next(n for n in members if n.endswith("top_level.txt"))
    with tarfile.open(staged) as tar:
        declared = tar.extractfile(prefix + top_level).read().decode().split()
    assert sorted(declared) == sorted(PACKAGES)


@pytest.mark.slow
def test_staged_tarball_installs_and_imports_the_pipeline(staged, tmp_path):
    target = tmp_path / "site"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                           "--no-index", "--no-build-isolation", "--target", str(target),
                           str(staged)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    check = ("import beam, muse_tf, serving\n"
             "from beam import build_dataset, transforms\n"
             "print(beam.__file__, muse_tf.__file__, serving.__file__)\n"
             "assert transforms.ParseSamples and build_dataset.build_pipeline\n")
    env = {**os.environ, "PYTHONPATH": str(target)}
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    paths = done.stdout.split()
    assert len(paths) == 3 and all(p.startswith(str(target)) for p in paths), done.stdout
