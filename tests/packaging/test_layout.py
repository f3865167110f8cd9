"""The one-namespace layout: dependency direction, cheap import, wrong-name guards."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FOLDERS = {"quant_core": "core", "kernels": "kernels", "plugins": "plugins", "integrations": "integrations"}
# what each layer may import from piecewise_quant (integrations -> core -> kernels/plugins)
ALLOWED = {
    "kernels": {"kernels"},
    "plugins": {"plugins"},
    "core": {"core", "kernels", "plugins"},
    "integrations": {"integrations", "core", "kernels", "plugins"},
}
HOSTS = ("transformers", "diffusers", "vllm", "peft", "optimum")


def _layer_of_import(module: str) -> str | None:
    if not module.startswith("piecewise_quant"):
        return None
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in ("kernels", "plugins", "integrations"):
        return parts[1]
    return "core"


def _resolve(path: Path, node: ast.ImportFrom) -> list[str]:
    folder = path.relative_to(REPO).parts[0]
    pkg = {"quant_core": "piecewise_quant", "kernels": "piecewise_quant.kernels",
           "plugins": "piecewise_quant.plugins", "integrations": "piecewise_quant.integrations"}[folder]
    rel_parts = list(path.relative_to(REPO / folder).with_suffix("").parts)
    if rel_parts[-1] == "__init__":
        rel_parts = rel_parts[:-1]
    else:
        rel_parts = rel_parts[:-1]
    base = pkg.split(".") + rel_parts
    if node.level:
        base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if node.module is None or node.level:
        return [target] + [f"{target}.{a.name}" for a in node.names]
    return [target]


def _imports(path: Path) -> list[tuple[str, int, bool]]:
    """(module, line, top_level) for every import in ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    top = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno, id(node) in top) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            out += [(m, node.lineno, id(node) in top) for m in _resolve(path, node)]
    return out


def test_dependency_direction_is_one_way():
    violations = []
    for folder, layer in FOLDERS.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            for module, line, _ in _imports(path):
                target = _layer_of_import(module)
                if target and target not in ALLOWED[layer]:
                    violations.append(f"{path.relative_to(REPO)}:{line} ({layer}) imports {module} ({target})")
    assert not violations, "\n".join(violations)


def test_core_kernels_and_plugins_never_import_host_frameworks_at_module_level():
    offenders = []
    for folder in ("quant_core", "kernels", "plugins"):
        for path in sorted((REPO / folder).rglob("*.py")):
            for module, line, _top in _imports(path):
                if module.split(".")[0] in HOSTS:
                    offenders.append(f"{path.relative_to(REPO)}:{line} imports {module}")
    assert not offenders, "\n".join(offenders)


def test_import_piecewise_quant_is_light():
    code = (
        "import sys, time; t = time.perf_counter(); import piecewise_quant as pq; "
        "pq.PiecewiseQuantConfig(bits=3); dt = time.perf_counter() - t; "
        "heavy = [m for m in ('torch', 'transformers', 'diffusers', 'vllm', 'peft', 'optimum', 'triton') if m in sys.modules]; "
        "print(heavy); print(dt)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/")
    heavy, _ = out.stdout.strip().splitlines()
    assert heavy == "[]", f"import piecewise_quant pulled in {heavy}"


def test_using_the_core_does_not_import_host_frameworks():
    code = (
        "import sys, torch, piecewise_quant as pq; "
        "m = pq.quantize(torch.nn.Sequential(torch.nn.Linear(64, 8)), pq.PiecewiseQuantConfig(group_size=32), progress=False); "
        "m(torch.randn(2, 64)); "
        "print([h for h in ('transformers', 'diffusers', 'vllm', 'peft', 'optimum') if h in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/")
    assert out.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("folder", ["plugins", "quant_core", "integrations"])
def test_folders_refuse_to_import_under_their_folder_name(folder):
    code = f"import sys; sys.path.insert(0, {str(REPO)!r}); import {folder}"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert out.returncode != 0
    assert "must be imported as 'piecewise_quant" in out.stderr


def test_kernels_folder_is_an_inert_shell_under_the_hf_kernels_name():
    # transformers probes Hugging Face's `kernels` package by importing it: from the repo root the
    # folder must neither run our code under that name nor break transformers' probe
    code = (
        f"import sys; sys.path.insert(0, {str(REPO)!r}); import kernels; "
        "assert getattr(kernels, '__file__', None) is None and not hasattr(kernels, 'ops'); "
        "from transformers.utils.import_utils import is_kernels_available; assert not is_kernels_available()\n"
        "try:\n    import kernels.ops\nexcept ImportError:\n    print('refused')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "refused"
