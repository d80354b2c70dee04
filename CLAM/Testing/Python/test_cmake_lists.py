"""The Slicer extension's build files: every script and resource listed, metadata filled in, index entry valid."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
MODULE_DIR = ROOT / "CLAM"
EXTENSION_VARIABLES = ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                       "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS")


def cmake_set(text: str) -> dict[str, str]:
    """Values of set(NAME value...) commands, with ${VAR} references expanded from earlier sets."""
    values: dict[str, str] = {}
    for name, body in re.findall(r"^\s*set\(\s*(\w+)\s+(.*?)\)\s*(?:#.*)?$", text, flags=re.MULTILINE | re.DOTALL):
        value = body.strip().strip('"')
        values[name] = re.sub(r"\$\{(\w+)\}", lambda m: values.get(m.group(1), m.group(0)), value)
    return values


def cmake_list(text: str, name: str) -> list[str]:
    """Items of a multi-line set(NAME ...) list, ${MODULE_NAME} expanded."""
    match = re.search(rf"set\(\s*{name}\s+(.*?)\)", text, flags=re.DOTALL)
    assert match, f"{name} not set"
    return [item.replace("${MODULE_NAME}", "CLAM") for item in match.group(1).split()]


def test_module_cmakelists_lists_every_script_and_resource():
    """Each CLAMLib/*.py, each CLAM/*.py and every file under Resources/ is listed, and nothing else."""
    text = (MODULE_DIR / "CMakeLists.txt").read_text()
    scripts = cmake_list(text, "MODULE_PYTHON_SCRIPTS")
    resources = cmake_list(text, "MODULE_PYTHON_RESOURCES")
    on_disk_scripts = {p.name for p in MODULE_DIR.glob("*.py")} | {
        p.relative_to(MODULE_DIR).as_posix() for p in (MODULE_DIR / "CLAMLib").rglob("*.py")
        if "__pycache__" not in p.parts}
    on_disk_resources = {p.relative_to(MODULE_DIR).as_posix() for p in (MODULE_DIR / "Resources").rglob("*")
                         if p.is_file() and not p.name.startswith(".")}
    assert sorted(set(scripts) ^ on_disk_scripts) == [], "MODULE_PYTHON_SCRIPTS differs from the files on disk"
    assert sorted(set(resources) ^ on_disk_resources) == [], "MODULE_PYTHON_RESOURCES differs from Resources/"
    assert len(scripts) == len(set(scripts)) and len(resources) == len(set(resources))


def test_module_cmakelists_builds_tests():
    """Scripted module macro with generic tests; the module's self-test registered under BUILD_TESTING."""
    text = (MODULE_DIR / "CMakeLists.txt").read_text()
    assert re.search(r"slicerMacroBuildScriptedModule\(.*NAME \$\{MODULE_NAME\}.*SCRIPTS.*RESOURCES.*"
                     r"WITH_GENERIC_TESTS.*?\)", text, flags=re.DOTALL)
    assert re.search(r"if\(BUILD_TESTING\).*slicer_add_python_unittest\(SCRIPT \$\{MODULE_NAME\}\.py\).*endif",
                     text, flags=re.DOTALL)
    assert cmake_set(text)["MODULE_NAME"] == "CLAM"


def test_top_level_cmakelists_is_a_complete_extension():
    """project(CLAM), every EXTENSION_* variable non-empty, Slicer found, module added, config and CPack."""
    text = (ROOT / "CMakeLists.txt").read_text()
    values = cmake_set(text)
    assert re.search(r"^project\(CLAM\)", text, flags=re.MULTILINE)
    for name in EXTENSION_VARIABLES:
        assert values.get(name, "").strip() and "${" not in values[name], f"{name} is empty or unresolved"
    assert values["EXTENSION_DEPENDS"] == "PyTorch"
    assert values["EXTENSION_CONTRIBUTORS"] == "CLAM team"
    assert values["EXTENSION_ICONURL"].endswith("CLAM/Resources/Icons/CLAM.png")
    for url in values["EXTENSION_SCREENSHOTURLS"].split():
        assert url.startswith("https://")
        assert (ROOT / url.split("/main/", 1)[1]).is_file(), f"screenshot {url} not in the repository"
    order = ["find_package(Slicer REQUIRED)", "include(${Slicer_USE_FILE})", "add_subdirectory(CLAM)",
             "include(${Slicer_EXTENSION_GENERATE_CONFIG})", "include(${Slicer_EXTENSION_CPACK})"]
    positions = [text.find(line) for line in order]
    assert -1 not in positions and positions == sorted(positions), "extension commands missing or out of order"


def test_extensions_index_entry():
    """CLAM.json: schema, category and dependency agree with CMakeLists; name rules of the index."""
    entry = json.loads((ROOT / "CLAM.json").read_text())
    values = cmake_set((ROOT / "CMakeLists.txt").read_text())
    assert entry["$schema"].startswith("https://raw.githubusercontent.com/Slicer/Slicer/")
    assert entry["category"] == values["EXTENSION_CATEGORY"]
    assert entry["build_dependencies"] == ["PyTorch"]
    assert values["EXTENSION_HOMEPAGE"].startswith(entry["scm_url"].removesuffix(".git") + "#")
    assert entry["scm_url"].rstrip("/").split("/")[-1].startswith("Slicer")  # the repository name
    assert not "CLAM".startswith("Slicer")  # the extension name must not


def test_license_icon_and_screenshot():
    """BSD 3-Clause licence; a 128 x 128 PNG icon; the screenshot is a PNG."""
    licence = (ROOT / "LICENSE").read_text()
    assert licence.startswith("BSD 3-Clause License") and "CLAM contributors" in licence
    for path, size in ((MODULE_DIR / "Resources/Icons/CLAM.png", (128, 128)),
                       (MODULE_DIR / "Resources/Screenshots/CLAM_screenshot.png", None)):
        header = path.read_bytes()[:24]
        assert header[:8] == b"\x89PNG\r\n\x1a\n", path
        if size:
            assert struct.unpack(">II", header[16:24]) == size


# The Extensions Index's checker (Slicer/ExtensionsIndex, scripts/check_description_files.py,
# check_cmakelists_content) reads these from the raw text with these patterns; it expands no ${VAR}.
INDEX_PROJECT_PATTERN = r"project\s*\(\s*([^\s\)\n\r]+)"
INDEX_ICON_PATTERN = r'set\s*\(EXTENSION_ICONURL\s*"([^"]+)"[ ]*\)'
INDEX_SCREENSHOTS_PATTERN = r'set\s*\(EXTENSION_SCREENSHOTURLS\s*"([^"]+)"\)'
RAW_PREFIX = "https://raw.githubusercontent.com/clam-team/SlicerCLAM/main/"


def test_extensions_index_reads_literal_urls_of_files_in_the_repository():
    """Project name, icon and screenshot URLs as the index's checker finds them: literal, https, files here."""
    text = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    flags = re.IGNORECASE | re.MULTILINE
    assert re.findall(INDEX_PROJECT_PATTERN, text, flags)[0] == ROOT.joinpath("CLAM.json").stem
    icons = re.findall(INDEX_ICON_PATTERN, text, flags)
    screenshots = re.findall(INDEX_SCREENSHOTS_PATTERN, text, flags)
    assert icons and screenshots, "the index's checker finds no EXTENSION_ICONURL or EXTENSION_SCREENSHOTURLS"
    entry = json.loads((ROOT / "CLAM.json").read_text())
    raw = entry["scm_url"].removesuffix(".git").replace("https://github.com/", "https://raw.githubusercontent.com/")
    assert RAW_PREFIX == f"{raw}/{entry['scm_revision']}/"
    for url in [icons[0].strip(), *screenshots[0].split()]:
        assert "${" not in url and url.startswith(RAW_PREFIX), url
        file = ROOT / url.removeprefix(RAW_PREFIX)
        assert file.is_file() and file.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{url} names no PNG here"


def test_cmake_minimum_of_the_current_extension_template():
    """The top-level CMake minimum is the one Slicer's current extension template asks for."""
    text = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    assert text.startswith("cmake_minimum_required(VERSION 3.28.0...3.28.0 FATAL_ERROR)\n")
