"""Run the Extensions Index's own checks (its scripts/check_description_files.py) on this repository, offline.

The index's script clones the repository, downloads the entry's JSON schema and the icon and screenshot URLs.
Here the clone is a local `git clone` of this repository's committed state, the schema is a local file and
raw.githubusercontent.com URLs of this repository are served from that clone; nothing else is reachable.
The GitHub topics check needs the GitHub API and is not run.

    python CLAM/Testing/Python/check_extensions_index.py --index PATH/ExtensionsIndex \\
        --schema PATH/slicer-extension-catalog-entry-schema-v1.0.1.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any
from unittest import mock

ROOT = Path(__file__).resolve().parents[3]
ENTRY = ROOT / "CLAM.json"


class Response:
    """What the checker reads from a requests response."""

    def __init__(self, content: bytes, content_type: str) -> None:
        """A 200 response with a body and a content type."""
        self.status_code = 200
        self.content = content
        self.headers = {"Content-Type": content_type}

    def raise_for_status(self) -> None:
        """Never an HTTP error: absent files are refused before a Response is made."""

    def json(self) -> Any:
        """The body parsed as JSON."""
        return json.loads(self.content)


def load_checker(index: Path) -> ModuleType:
    """The index's check_description_files.py as a module."""
    spec = importlib.util.spec_from_file_location("check_description_files", index / "scripts" /
                                                  "check_description_files.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if module.requests is None or module.jsonschema is None:
        raise SystemExit("the index's checker needs jsonschema and requests (pip install jsonschema requests)")
    return module


def offline_get(checker: ModuleType, entry: dict, schema: Path, clone: Path):
    """A requests.get that serves the schema and this repository's raw files, and refuses anything else."""
    raw = entry["scm_url"].removesuffix(".git").replace("https://github.com/", "https://raw.githubusercontent.com/")
    prefix = f"{raw}/{entry['scm_revision']}/"

    def get(url: str, *args: Any, **kwargs: Any) -> Response:
        if url == entry["$schema"].split("#")[0]:
            return Response(schema.read_bytes(), "application/json")
        file = clone / url.removeprefix(prefix)
        if url.startswith(prefix) and file.is_file():
            kind = {".png": "image/png", ".jpg": "image/jpeg", ".gif": "image/gif"}.get(file.suffix.lower())
            return Response(file.read_bytes(), kind or "application/octet-stream")
        raise checker.requests.ConnectionError(f"offline: {url} is not a file of this repository")

    return get


def main() -> int:
    """Run every check the index runs except the clone over the network and the GitHub topics."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index", type=Path, required=True, help="a clone of github.com/Slicer/ExtensionsIndex")
    parser.add_argument("--schema", type=Path, required=True, help="a local copy of the file CLAM.json's $schema names")
    args = parser.parse_args()
    checker = load_checker(args.index)
    entry = checker.parse_json(str(ENTRY))
    name = ENTRY.stem
    with tempfile.TemporaryDirectory(prefix="clam-index-check-") as folder:
        clone = Path(folder) / "clone"
        subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True)
        checks = [
            ("repository size", checker.check_repository_size, {"cloned_repository_folder": str(clone)}),
            ("JSON schema", checker.check_json_schema, {}),
            ("JSON file format", checker.check_json_file_format, {"extension_file_path": str(ENTRY)}),
            ("extension name", checker.check_extension_name, {}),
            ("category", checker.check_category, {}),
            ("git repository name", checker.check_git_repository_name, {}),
            ("SCM URL syntax", checker.check_scm_url_syntax, {}),
            ("CMakeLists.txt content", checker.check_cmakelists_content, {"cloned_repository_folder": str(clone)}),
            ("license file", checker.check_license_file, {"cloned_repository_folder": str(clone)}),
        ]
        failed = 0
        with mock.patch.object(checker.requests, "get", offline_get(checker, entry, args.schema, clone)):
            for label, check, kwargs in checks:
                try:
                    check(name, entry, **kwargs)
                except checker.ExtensionCheckError as error:
                    failed += 1
                    print(f"FAIL {label}: {error}")
                else:
                    print(f"pass {label}")
    print(f"{len(checks) - failed} of {len(checks)} checks passed (GitHub topics not checked offline)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
