"""A non-editable install holds every package folder (new ones too), the license and the version.

Editable installs and the tests read the source tree, so they would pass even if `pip install .` left a
folder out; this builds a wheel from a copy of the tree with one extra kernel folder, installs it into a
scratch directory and imports it from there. A few seconds (pip's build environment is cached).
"""

import email
import pathlib
import shutil
import subprocess
import sys
import zipfile

import pytest

import shardattn

ROOT = pathlib.Path(__file__).resolve().parent.parent
FOLDERS = {"shardattn": "shardattn", "kernels": "shardattn/kernels", "meshes": "shardattn/meshes"}


@pytest.mark.slow
def test_wheel_holds_every_package_the_license_and_the_version(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    for folder in FOLDERS:
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    # A folder that no configuration file names, as kernels/attention will be.
    probe = src / "kernels" / "probe_algorithm"
    probe.mkdir()
    (probe / "__init__.py").write_text('"""A new algorithm folder."""\n')
    (probe / "xla.py").write_text("VALUE = 42\n")

    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"), str(src)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert build.returncode == 0, build.stdout + build.stderr
    (wheel,) = (tmp_path / "dist").glob("shardattn-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())

    expected = {
        f"{FOLDERS[py.relative_to(src).parts[0]]}/{pathlib.PurePath(*py.relative_to(src).parts[1:])}"
        for folder in FOLDERS
        for py in (src / folder).rglob("*.py")
    }
    assert "shardattn/kernels/probe_algorithm/xla.py" in expected
    assert expected <= names, sorted(expected - names)
    info = f"shardattn-{shardattn.__version__}.dist-info"
    assert f"{info}/licenses/LICENSE" in names, sorted(names)
    metadata = email.message_from_bytes(zipfile.ZipFile(wheel).read(f"{info}/METADATA"))
    assert metadata["Version"] == shardattn.__version__  # single-sourced from shardattn/__init__.py
    assert metadata["License-Expression"] == "Apache-2.0"
    assert "Homepage, https://github.com/shardattn/shardattn" in metadata.get_all("Project-URL")

    # Installed (not editable) into a scratch directory and imported from there, away from the tree.
    site = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert install.returncode == 0, install.stdout + install.stderr
    code = (
        "import shardattn, shardattn.kernels.lightning.xla, shardattn.meshes.specs;"
        "from shardattn.kernels.probe_algorithm import xla;"
        "print(shardattn.__file__, shardattn.__version__, xla.VALUE)"
    )
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"}
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stderr
    file, version, value = run.stdout.split()
    assert pathlib.Path(file).is_relative_to(site) and version == shardattn.__version__ and value == "42"
