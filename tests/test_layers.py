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


# ---------------------------------------------------------------- one seam for model families

def tiny_models():
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    llama = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                         num_attention_heads=2, num_key_value_heads=2))
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=3, n_head=2, n_positions=32))
    return {"llama": (llama, llama.model.layers, "mlp.down_proj.weight"),
            "gpt2": (gpt2, gpt2.transformer.h, "mlp.c_proj.weight")}


def test_layers_are_found_by_structure_in_llama_and_gpt2():
    """RMU's steered layer, its trained parameters and frozen layer ranges
    ask the model for its layers: GPT-2 (`transformer.h.{i}`) works as Llama does."""
    from rmu.unlearn_pipeline import RmuSettings, select_trainable
    from toolkit.architecture import decoder_layers, parameter_layers
    from toolkit.training import freeze_layer_ranges

    for family, (model, layers, down) in tiny_models().items():
        assert decoder_layers(model) is layers, family
        layer_of = parameter_layers(model)
        assert sorted(set(layer_of.values())) == [0, 1, 2], family
        freeze_layer_ranges(model, [(0, 2)])
        frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
        assert frozen == {n for n, i in layer_of.items() if i in (0, 1)}, family
        chosen = select_trainable(model, [1, 2], [down])
        assert len(chosen) == 2 and all(layer_of[n] in (1, 2) and n.endswith(down) for n in chosen), family
        RmuSettings.check_model(RmuSettings(6.5, 2, [1, 2], (down,), 0), model)


def test_lora_targets_auto_are_the_linear_layers_inside_the_decoder_layers():
    """unlearn.lora_target_modules=auto: whatever a family names its
    projections (Llama's q_proj ... down_proj, GPT-2's Conv1D c_attn, c_proj,
    c_fc), LoRA wraps the layers inside the decoder, never the head."""
    from toolkit.architecture import lora_targets
    from toolkit.models import attach_lora, lora_layers

    expected = {"llama": ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"],
                "gpt2": ["c_attn", "c_fc", "c_proj"]}
    for family, (model, layers, _) in tiny_models().items():
        assert lora_targets(model, "auto") == expected[family], family
        wrapped = attach_lora(model, 2, target_modules="auto")
        assert len(lora_layers(wrapped)) == len(expected[family]) * len(layers) + (len(layers) if family == "gpt2"
                                                                                   else 0), family
