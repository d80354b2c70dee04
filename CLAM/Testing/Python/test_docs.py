"""User documentation: the paper cited exactly everywhere, every link of README.md and docs/ resolves."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
AUTHORS = "Sarah Ryan, Nichole Carlson, Harris Butler, Tasha Fingerlin, Lisa Maier, Fuyong Xing"
TITLE = "Cluster activation mapping with application to computed tomography scans of the lung"
JOURNAL = "9(2):026001, 2022"
DOI = "10.1117/1.JMI.9.2.026001"
# Wrong citations seen before: other authors, the first author's initial, the preprint's title given to the paper.
WRONG = ("Maclean", "Balaban", "D. K.", "J. Ryan", "applications to computed tomography")


def flat(text: str) -> str:
    """Text with markdown emphasis, quote markers and line breaks removed, whitespace collapsed."""
    text = re.sub(r"^\s*>\s?", "", text, flags=re.MULTILINE)
    return " ".join(text.replace("*", "").split())


def acknowledgement() -> str:
    """The module's acknowledgementText, read from CLAM.py's source."""
    tree = ast.parse((ROOT / "CLAM" / "CLAM.py").read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if (isinstance(node, ast.Assign) and ast.unparse(node.targets[0]) == "self.parent.acknowledgementText"):
            value = node.value.args[0] if isinstance(node.value, ast.Call) else node.value
            return ast.literal_eval(value)
    raise AssertionError("no acknowledgementText in CLAM.py")


def documents() -> list[Path]:
    """README.md and every page under docs/."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_readme_and_module_cite_the_paper_exactly():
    """Full author list, title, journal and DOI in the README and in the module's acknowledgement."""
    for text in (flat((ROOT / "README.md").read_text(encoding="utf-8")), flat(acknowledgement())):
        assert AUTHORS in text and TITLE in text and JOURNAL in text and DOI in text


def test_no_wrong_citation_anywhere():
    """No other authors, initials or title anywhere the extension describes itself."""
    files = [*documents(), ROOT / "CLAM" / "CLAM.py", ROOT / "CMakeLists.txt", ROOT / "CLAM.json",
             ROOT / "CLAM" / "Resources" / "UI" / "CLAM.ui"]
    for file in files:
        text = flat(file.read_text(encoding="utf-8"))
        found = [w for w in WRONG if w in text]
        assert not found, f"{file.relative_to(ROOT)}: {found}"
    description = re.search(r'set\(EXTENSION_DESCRIPTION "([^"]+)"\)', (ROOT / "CMakeLists.txt").read_text())
    assert description and "S. Ryan et al., J. Med. Imaging 9(2):026001, 2022" in description.group(1)
    assert "Ryan" not in json.dumps(json.loads((ROOT / "CLAM.json").read_text()))  # the index entry cites nothing


def test_every_relative_link_resolves():
    """Links and images in README.md and docs/*.md name files or folders of the repository."""
    for document in documents():
        text = document.read_text(encoding="utf-8")
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            path = (document.parent / target.split("#")[0]).resolve()
            assert path.exists(), f"{document.relative_to(ROOT)} links to missing {target}"


def section(text: str, heading: str) -> str:
    """The body of a '## heading' section of a markdown text."""
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, flags=re.MULTILINE | re.DOTALL)
    assert match, f"no section '{heading}'"
    return match.group(1)


def test_readme_is_short_and_links_every_docs_page():
    """The README stays under 12 KB; the research record lives in docs/, each page linked from it."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.encode("utf-8")) < 12 * 1024
    pages = {p.name for p in (ROOT / "docs").glob("*.md")}
    assert {"simulation-study.md", "real-anatomy.md", "map-design.md", "performance.md"} <= pages
    linked = set(re.findall(r"\]\(docs/([\w.-]+\.md)\)", readme))
    assert pages == linked, f"docs pages not linked from the README: {sorted(pages - linked)}"


def test_readme_names_the_panel_as_the_panel_does():
    """Every *label* and **button** the README's Slicer section names is a label, group or button of CLAM.ui."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    steps = " ".join(section(readme, "Your first map in 3D Slicer").split())
    ui = (ROOT / "CLAM" / "Resources" / "UI" / "CLAM.ui").read_text(encoding="utf-8")
    texts = {t.rstrip(":") for t in re.findall(r"<string>([^<]+)</string>", ui)}
    named = set(re.findall(r"(?<![*\w])\*([A-Z][^*]+?)\*(?!\*)", steps)) | set(re.findall(r"\*\*(\w+)\*\*", steps))
    assert {"Input CT", "Model bundle", "Apply", "Demo"} <= named
    assert named <= texts, f"named in the README but not in the panel: {sorted(named - texts)}"
    assert "Input volume" not in readme


def test_readme_and_help_agree_on_the_quick_demo():
    """The time `clam demo --quick` takes is the one its --help gives."""
    from CLAMLib.cli import build_parser

    demo = build_parser()._subparsers._group_actions[0].choices["demo"]
    quick = next(a.help for a in demo._actions if "--quick" in a.option_strings)
    duration = re.search(r"\((about [^)]+)\)", quick).group(1)
    readme = " ".join((ROOT / "README.md").read_text(encoding="utf-8").split())
    assert f"`clam demo --quick` runs one scenario at the true k ({duration})" in readme
