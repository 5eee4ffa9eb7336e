"""The package's layering (pyproject's import-linter contract) holds, and would catch a breach."""
import shutil
import subprocess
import sys
from pathlib import Path

from helpers import REPO

LINT = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command as c; sys.exit(c())"]


def lint(root: Path) -> subprocess.CompletedProcess:
    """import-linter over the package found at ``root`` with ``root``'s pyproject contract."""
    env = {"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"}
    return subprocess.run(LINT + ["--config", str(root / "pyproject.toml"), "--no-cache"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=120)


def test_imports_point_down_only():
    result = lint(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout


def test_an_upward_import_breaks_the_contract(tmp_path):
    shutil.copytree(REPO / "moe_hpc", tmp_path / "moe_hpc", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    errors = tmp_path / "moe_hpc" / "config" / "errors.py"          # the bottom floor ...
    errors.write_text(errors.read_text() + "\nfrom ..runtime import engine  # noqa: E402,F401\n")  # ... reaching up
    result = lint(tmp_path)
    assert result.returncode != 0
    assert "BROKEN" in result.stdout and "moe_hpc.config.errors -> moe_hpc.runtime.engine" in result.stdout


def test_architecture_page_names_every_module():
    """docs/architecture.md's floors drawing names every module of the package in its
    subpackage's box, so the drawing stays drawn from the code."""
    import re
    page = (REPO / "docs" / "architecture.md").read_text()
    drawing = page[page.index("## The floors"):page.index("What each floor owns")]
    named, columns = {}, []                     # subpackage -> words in its box; the row's boxes
    for line in drawing.splitlines():
        if not line.strip().startswith("|"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        heads = [c.split()[0] if c else "" for c in cells]
        if all((REPO / "moe_hpc" / h).is_dir() for h in heads):        # a floor's first row
            columns = heads
            cells = [c[len(h):] for c, h in zip(cells, heads)]
        for box, cell in zip(columns, cells):
            named.setdefault(box, set()).update(re.findall(r"[a-z_0-9]+", cell))
    missing = [f"{p.parent.name}/{p.name}" for p in sorted((REPO / "moe_hpc").glob("*/*.py"))
               if p.name != "__init__.py" and p.stem not in named.get(p.parent.name, ())]
    assert not missing, f"docs/architecture.md's floors do not name: {missing}"
