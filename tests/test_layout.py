"""The package's structure: imports flow one way, and transformers stays inside gpt2repro/hf/."""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "gpt2repro"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every module `path` imports, at module level or inside functions, as absolute names."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}  # `from . import io` names a module
    return found


def internal_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        targets = {m for m in imports(path) if m in modules and m != name}
        # importing a.b.c runs a/__init__ and a/b/__init__ first: an edge to each
        graph[name] = targets | {".".join(t.split(".")[:i]) for t in targets for i in range(2, t.count(".") + 1)} - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle_counting_imports_inside_functions():
    graph = internal_graph()
    assert len(graph) > 30  # every module was read
    # a package __init__ that re-exports its own modules is not a cycle with them
    graph = {m: {t for t in targets if not m.startswith(t + ".")} for m, targets in graph.items()}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_core_never_imports_train_eval_or_hf():
    graph = internal_graph()
    core = ("errors", "io", "config", "presets", "tokenizer", "model", "data", "run_dir")
    def layer(module: str) -> str:
        return (module.split(".") + [""])[1]

    for name, targets in graph.items():
        if layer(name) in core:
            upward = {t for t in targets if layer(t) in ("checkpoint", "train", "eval", "hf", "plot", "bench")}
            assert not upward, f"{name} imports {upward}"


def test_transformers_is_imported_only_under_hf():
    for path in PACKAGE.rglob("*.py"):
        name = module_name(path)
        if name.startswith("gpt2repro.hf") or name == "gpt2repro.bench":  # bench imports it through hf, to compare
            continue
        assert not {m for m in imports(path) if m.split(".")[0] == "transformers"}, name


def test_eval_sample_and_export_of_our_checkpoint_do_not_import_transformers_until_they_touch_hf(tmp_path):
    script = f"""
import sys
from gpt2repro import GPT, GPTConfig
from gpt2repro.__main__ import main
from gpt2repro.checkpoint import save_model_dir
model = GPT(GPTConfig(block_size=16, n_layer=1, n_head=1, n_embd=8))
save_model_dir({str(tmp_path / 'ckpt')!r}, model.config, model.state_dict())
hs = {str(tmp_path / 'hs.jsonl')!r}
open(hs, "w").write('{{"ctx": "A cat", "endings": ["sat.", "ran.", "flew.", "sang."], "label": 0}}\\n')
assert main(["eval", "--model", {str(tmp_path / 'ckpt')!r}, "--hellaswag", hs, "--device", "cpu"]) == 0
assert main(["sample", "--model", {str(tmp_path / 'ckpt')!r}, "--prompt", "Hi", "--num", "1", "--max-new-tokens", "2",
             "--device", "cpu"]) == 0
assert "transformers" not in sys.modules, "eval or sample imported transformers"
assert main(["export", {str(tmp_path / 'ckpt')!r}, "--out", {str(tmp_path / 'hf')!r}]) == 0
assert "transformers" in sys.modules  # writing an HF directory is where it belongs
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
