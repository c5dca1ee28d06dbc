"""Package discovery for setuptools; every other piece of metadata is in pyproject.toml.

kernels/ and meshes/ are top-level folders that install as the subpackages shardattn.kernels and
shardattn.meshes (docs/design.md, "Layout"). pyproject.toml's package finder cannot rename what it
finds, so the packages are found here: every folder with an __init__.py below each mapped folder is
included, so that a new one (kernels/attention) needs no edit.
"""

from setuptools import find_packages, setup

PACKAGE_DIR = {"shardattn": "shardattn", "shardattn.kernels": "kernels", "shardattn.meshes": "meshes"}

packages = []
for name, folder in PACKAGE_DIR.items():
    packages += [name, *(f"{name}.{sub}" for sub in find_packages(where=folder))]

setup(packages=packages, package_dir=PACKAGE_DIR)
