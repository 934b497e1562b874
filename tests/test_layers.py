"""The toolkit's layers go one way: reading and writing result rows,
planning and the analysis need no torch, and no module imports one that
imports it back."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

# Run in a fresh interpreter where torch, transformers and peft cannot be imported.
BLOCKED = """
import sys
class Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers", "peft"):
            raise ImportError(name + " is blocked in this test")
sys.meta_path.insert(0, Blocked())
sys.path.insert(0, {root!r})
"""


def run_without_torch(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCKED.replace("{root!r}", repr(str(ROOT))) + code], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_results_planning_and_analysis_import_without_torch(tmp_path):
    modules = ["toolkit.results", "toolkit.planner", "toolkit.checks", "toolkit.registry", "toolkit.sweep_settings",
               "toolkit.comparison", "toolkit.bootstrap", "toolkit.resources", "analyze_recovery"]
    result = run_without_torch("import importlib\n" + "".join(f"importlib.import_module({m!r})\n" for m in modules)
                               + "assert 'torch' not in sys.modules\nprint('imported')", tmp_path)
    assert result.returncode == 0 and "imported" in result.stdout, result.stderr[-3000:]


def test_a_published_table_is_analysed_without_torch(tmp_path):
    """Not only imported: the analysis reads a published folder and writes its table and figure."""
    code = ("import analyze_recovery\n"
            f"code = analyze_recovery.main(['--results-dir', {str(ROOT / 'results' / 'rank_study_pretrained_fp32')!r}, "
            f"'--out-dir', {str(tmp_path)!r}, '--bootstrap', '200', '--attacker', 'cross_fitted'])\n"
            "assert code == 0 and 'torch' not in sys.modules\n")
    result = run_without_torch(code, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "recovered" in result.stdout and (tmp_path / "recovery_vs_rank.png").is_file()


def module_imports(path: Path) -> set[str]:
    """The toolkit modules a module imports when it is imported (top level,
    not under `if TYPE_CHECKING:` and not inside functions)."""
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("toolkit."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("toolkit.")}
    return found


def test_the_toolkit_has_no_import_circle():
    graph = {p.stem: module_imports(p) for p in (ROOT / "toolkit").glob("*.py") if p.stem != "__init__"}
    state: dict[str, str] = {}

    def visit(name: str, trail: list[str]) -> None:
        if state.get(name) == "done":
            return
        assert state.get(name) != "open", f"import circle: {' -> '.join([*trail, name])}"
        state[name] = "open"
        for dep in sorted(graph.get(name, ())):
            visit(dep, [*trail, name])
        state[name] = "done"

    for module in sorted(graph):
        visit(module, [])
