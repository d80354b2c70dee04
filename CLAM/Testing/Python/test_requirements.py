"""Resources/requirements.txt is the one install list: it matches pyproject.toml and the engine's imports."""

from __future__ import annotations

import ast
import importlib.metadata
import sys
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[3]
MODULE_DIR = ROOT / "CLAM"
sys.path.insert(0, str(MODULE_DIR))
import CLAMDependencies  # noqa: E402

# Slicer's own Python packages that CLAM uses and must not replace, and torch, which the PyTorch extension installs.
FROM_SLICER = {"numpy", "simpleitk"}
FROM_PYTORCH_EXTENSION = {"torch"}
# What the module code beside the engine may import: Slicer itself and packages Slicer bundles
# (Slicer's SuperBuild/External_python-*.cmake list packaging among them).
# torch is imported only after ensureDependencies has installed it.
SLICER_MODULES = {"slicer", "qt", "ctk", "vtk", "numpy", "SimpleITK", "packaging", "PyTorchUtils", "torch",
                  "CLAMLib", "CLAMMRML", "CLAMDependencies"}


def top_level_imports(files: list[Path]) -> set[str]:
    """Top-level names of every absolute import in the files, nested imports included."""
    names = set()
    for file in files:
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"__future__"}


def distribution_of(import_name: str) -> str:
    """The canonical name of the installed distribution that provides an import name."""
    providers = importlib.metadata.packages_distributions().get(import_name)
    assert providers, f"no installed distribution provides '{import_name}'"
    return canonicalize_name(providers[0])


def install_list() -> dict[str, Requirement]:
    """requirements.txt by canonical name."""
    return {canonicalize_name(r.name): r for r in CLAMDependencies.load_requirements()}


def test_install_list_matches_pyproject():
    """Same packages and version ranges as pyproject's dependencies, less Slicer's own and torch."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    declared = {canonicalize_name(r.name): r for r in map(Requirement, project["dependencies"])}
    listed = install_list()
    assert set(declared) == set(listed) | FROM_SLICER | FROM_PYTORCH_EXTENSION
    for name, requirement in listed.items():
        assert requirement.specifier == declared[name].specifier, name
    assert str(declared["torch"].specifier) == CLAMDependencies.TORCH_REQUIREMENT


def test_install_list_covers_every_engine_import():
    """Every third-party package the engine imports (matplotlib in functions too) is installed by the module."""
    engine = top_level_imports(sorted((MODULE_DIR / "CLAMLib").glob("*.py")))
    needed = {distribution_of(name) for name in engine}
    assert "matplotlib" in needed and "scikit-learn" in needed
    provided = set(install_list()) | FROM_SLICER | FROM_PYTORCH_EXTENSION
    assert needed <= provided, f"imported by the engine but installed by nobody: {sorted(needed - provided)}"
    assert set(install_list()) <= needed, f"installed but never imported: {sorted(set(install_list()) - needed)}"


def test_module_code_imports_only_slicer_and_its_bundled_packages():
    """The module's own files (CLAM.py, CLAMMRML.py, CLAMCohort.py, ...) run before anything is installed."""
    files = sorted(MODULE_DIR.glob("*.py"))
    used = top_level_imports(files) - {file.stem for file in files}
    assert used <= SLICER_MODULES, sorted(used - SLICER_MODULES)


def test_missing_requirements(tmp_path):
    """Absent and too-old packages are reported as pip strings; installed ones are not."""
    file = tmp_path / "requirements.txt"
    file.write_text("# comment\n\n-c constraints.txt\nnumpy>=1.0\nnumpy>=999\nno-such-package-clam>=1\n")
    requirements = CLAMDependencies.load_requirements(file)
    assert [str(r) for r in requirements] == ["numpy>=1.0", "numpy>=999", "no-such-package-clam>=1"]
    assert CLAMDependencies.missing_requirements(requirements) == ["numpy>=999", "no-such-package-clam>=1"]
    assert CLAMDependencies.missing_requirements() == []
