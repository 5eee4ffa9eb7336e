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
    """docs/architecture.md's floors and text name every module of the package, so the drawing
    stays drawn from the code."""
    page = (REPO / "docs" / "architecture.md").read_text()
    missing = [str(p.relative_to(REPO / "moe_hpc")) for p in sorted((REPO / "moe_hpc").rglob("*.py"))
               if p.name not in ("__init__.py", "__main__.py", "cli.py") and p.stem not in page]
    assert not missing, f"docs/architecture.md does not name: {missing}"
