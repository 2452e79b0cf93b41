"""The package's shape: no import circle anywhere (TYPE_CHECKING imports included), importable where libc cannot be
loaded by name, and the model files import only torch, transformers and each other."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from helpers import prompts, reference, tiny_model

from hf_moe_offload import OffloadConfig, disable_offload, enable_offload


PACKAGE = Path(__file__).resolve().parents[1] / "hf_moe_offload"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports, from the source (every import statement, wherever it is)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        imported: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                submodules = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in modules]
                # `from . import x` with x a submodule imports x (its package is being imported already)
                targets = submodules if len(submodules) == len(node.names) else [target, *submodules]
            else:
                continue
            imported.update(t for t in targets if t in modules and t != name)
        graph[name] = imported
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return [*stack[stack.index(dep) :], dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_circle_in_the_package():
    graph = import_graph()
    assert "hf_moe_offload.offload.runtime" in graph and graph["hf_moe_offload.offload.hooks"] == set()
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_naive_cycle_finder_finds_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_the_offload_runtime_does_not_import_the_model_nor_the_model_the_package():
    graph = import_graph()
    offload = [name for name in graph if name.startswith("hf_moe_offload.offload")]
    assert all(not dep.startswith("hf_moe_offload.gpt_moe") for name in offload for dep in graph[name])
    for travelling in ("configuration_gpt_moe", "modeling_gpt_moe"):
        deps = graph[f"hf_moe_offload.gpt_moe.{travelling}"]
        assert deps <= {"hf_moe_offload.gpt_moe.configuration_gpt_moe"}, (travelling, deps)


def test_the_package_imports_and_offloads_where_libc_cannot_be_loaded(tmp_path):
    ids, tokens = prompts(), reference("llama")[1]
    torch.save({"ids": ids, "tokens": tokens, "moe": reference("gpt_moe_top2_capacity")[1]}, tmp_path / "reference.pt")
    script = textwrap.dedent(
        f"""
        import ctypes, sys
        import torch
        real = ctypes.CDLL
        def refuse(name, *args, **kwargs):
            if name is None:  # libc by name, as on Windows, where CDLL(None) fails
                raise OSError("libc cannot be loaded here")
            return real(name, *args, **kwargs)
        ctypes.CDLL = refuse
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import hf_moe_offload
        from hf_moe_offload.offload import pages
        from helpers import tiny_model
        assert not pages.supported()
        model = tiny_model("llama")
        config = hf_moe_offload.OffloadConfig(offload_device="nvme", nvme_path={str(tmp_path / "store")!r})
        hf_moe_offload.enable_offload(model, config)
        assert not model._hf_moe_offload_state.pipeline.map_files  # read into buffers instead of mapped
        reference = torch.load({str(tmp_path / "reference.pt")!r})
        assert torch.equal(model.generate(reference["ids"], max_new_tokens=6, do_sample=False), reference["tokens"])
        moe = tiny_model("gpt_moe_top2_capacity")  # routed experts with evictions: compact rows, no page dropping
        config = hf_moe_offload.OffloadConfig(expert_cache_size=1, expert_break_even=1.0)
        hf_moe_offload.enable_offload(moe, config)
        assert torch.equal(moe.generate(reference["ids"], max_new_tokens=6, do_sample=False), reference["moe"])
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


def test_a_config_can_be_offloaded_twice_in_a_row(tmp_path):
    model = tiny_model("gpt2")
    for _ in range(2):
        enable_offload(model, OffloadConfig(offload_device="nvme", nvme_path=tmp_path / "store"))
        assert torch.equal(model.generate(prompts(), max_new_tokens=6, do_sample=False), reference("gpt2")[1])
        disable_offload(model)
