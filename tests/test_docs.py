"""The front door and the rooms: README stays short with exactly its two set-up commands, the documentation site
builds with ``mkdocs build --strict`` (a broken link, a missing page or an API reference that does not resolve
fails it), and the package keeps its layer order (import-linter, ``.importlinter``) with no import cycle, each
check shown to fail on a package that breaks it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_is_a_front_door_with_its_two_set_up_commands():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 200
    setups = re.findall(r"^python3\.11 -m venv \.venv .*$", text, flags=re.M)
    assert len(setups) == 2 and "llmfirst ask" in setups[0] and "pytest" in setups[1]
    assert "## 한국어 요약" in text and not re.search(r"\b20\d\d-\d\d-\d\d\b", text)  # no dated measurements


def test_the_docs_site_builds_strictly(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    api = (tmp_path / "site" / "reference" / "index.html").read_text(encoding="utf-8")
    assert "capacity_table" in api and "PairwiseJudge" in api  # generated from the docstrings


def _lint_imports(config: Path) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or "lint-imports"
    return subprocess.run([exe, str(config), "--no-cache"], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


def test_the_layers_keep_their_order(tmp_path):
    proc = _lint_imports(ROOT / ".importlinter")
    assert proc.returncode == 0, proc.stdout[-3000:]
    # the contract can fail: with the command line and the backends swapped, every command breaks it
    reversed_config = tmp_path / "reversed.ini"
    text = (ROOT / ".importlinter").read_text(encoding="utf-8")
    reversed_config.write_text(text.replace("    llmfirst_kit.cli\n", "    llmfirst_kit.TMP\n")
                               .replace("    llmfirst_kit.backends\n", "    llmfirst_kit.cli\n")
                               .replace("    llmfirst_kit.TMP\n", "    llmfirst_kit.backends\n"), encoding="utf-8")
    broken = _lint_imports(reversed_config)
    assert broken.returncode != 0 and "BROKEN" in broken.stdout


def import_cycles(package: str) -> list[tuple[str, str]]:
    """Pairs (A, B) where A imports B and B leads back to A, function-level imports included (``if
    TYPE_CHECKING:`` imports excluded: never executed)."""
    import grimp  # import-linter's graph builder

    graph = grimp.build_graph(package, exclude_type_checking_imports=True)
    return [(a, b) for a in sorted(graph.modules) for b in sorted(graph.find_modules_directly_imported_by(a))
            if graph.chain_exists(importer=b, imported=a)]


def test_no_module_imports_one_that_imports_it_back(tmp_path):
    assert import_cycles("llmfirst_kit") == []
    # the check can fail: a package whose two modules import each other inside functions
    pkg = tmp_path / "cyclic"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from . import b\n")
    (pkg / "b.py").write_text("def g():\n    from . import a\n")
    sys.path.insert(0, str(tmp_path))
    try:
        assert ("cyclic.a", "cyclic.b") in import_cycles("cyclic")
    finally:
        sys.path.remove(str(tmp_path))
