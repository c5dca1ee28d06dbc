"""The repository documents itself: docs/design.md exists and every pointer to it names a real section,
nothing points outside the repository, docstring examples that claim an output give it, and the
quickstart prints its limits as they are."""

import doctest
import importlib.util
import pathlib
import re

import pytest
from jax.experimental import checkify

import shardattn.meshes.specs as specs

ROOT = pathlib.Path(__file__).resolve().parent.parent
DESIGN = ROOT / "docs" / "design.md"
SKIP = {".git", "build", "__pycache__", ".pytest_cache", ".ruff_cache", ".jax_cache", "results"}
# Written in pieces so that this file does not match itself.
OUTSIDE = ["DESIGN" + ".md", "JAX" + "_NOTES", "../" + "shared", "/work/" + "shared"]


def text_files():
    for path in ROOT.rglob("*"):
        parts = set(path.relative_to(ROOT).parts)
        if path.is_file() and not parts & SKIP and not any(p.endswith(".egg-info") for p in parts):
            if path.suffix in {".py", ".md", ".toml", ".txt", ".cfg"} or path.name in {"run", "LICENSE"}:
                yield path


def test_nothing_points_outside_the_repository():
    found = [
        f"{path.relative_to(ROOT)}: {word}"
        for path in text_files()
        for word in OUTSIDE
        if word in path.read_text(errors="replace")
    ]
    assert not found, found


def test_pointers_to_the_design_document_name_its_sections():
    headings = [line[3:].strip() for line in DESIGN.read_text().splitlines() if line.startswith("## ")]
    assert {"Layers, and who may import whom", "Sequence parallelism: the state scan"} <= set(headings)
    pointers = []
    for path in text_files():
        # the design document, a comma, then a quoted section name (possibly broken across lines)
        for match in re.finditer(r'docs/design\.md,\s*"([^"]+)"', path.read_text()):
            name = " ".join(match.group(1).split())
            pointers.append(name)
            assert any(h.startswith(name) for h in headings), (
                f"{path.name}: no section {name!r} in {headings}"
            )
    assert len(pointers) >= 3, pointers  # the sharded module, the checks module, the flax layer...


def test_qkv_spec_docstring_shows_what_it_returns():
    finder, runner = doctest.DocTestFinder(), doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    (test,) = finder.find(
        specs.qkv_spec, "qkv_spec", globs={"make_mesh": specs.make_mesh, "qkv_spec": specs.qkv_spec}
    )
    assert len(test.examples) >= 1
    result = runner.run(test, out=lambda _: None)
    assert result.failed == 0, "qkv_spec's docstring example gives another output"


def test_quickstart_prints_the_limits_it_checks(capsys):
    spec = importlib.util.spec_from_file_location("quickstart", ROOT / "examples" / "quickstart.py")
    quickstart = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quickstart)
    assert quickstart.main(["--seq-len", "64", "--heads", "2", "--head-dim", "8"]) == 0
    out = capsys.readouterr().out
    assert "(limit 2.0e-05/4.0e-05) -> ok" in out, out  # float32
    assert "(limit 1.5e-02/3.0e-02) -> ok" in out, out  # bfloat16 (was printed as 1e-02/3e-02)


def test_readme_checks_example_runs_and_reports():
    """The README's example of checks on traced values runs as written and throws our message."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Checks on traced values") :]
    code = section[section.index("```python\n") + len("```python\n") : section.index("```\n", 10)]
    with pytest.raises(checkify.JaxRuntimeError, match=r"slopes must be finite and >= 0"):
        exec(compile(code, "README.md", "exec"), {})
