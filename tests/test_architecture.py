"""The package's layers import only downward (the data flow), importing it compiles nothing, and loading and
running a saved model needs only storage and ops."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "svdquant_ops"
# Layer of each module (first matching prefix); a module may import its own layer and the ones below.
LAYERS = [
    ("svdquant_ops.formats", 0), ("svdquant_ops.layout", 0), ("svdquant_ops.quantizers", 0),
    ("svdquant_ops.storage", 1), ("svdquant_ops.tensor", 1),  # the latter: 0.1.0's path, an alias of storage.tensor
    ("svdquant_ops.ops", 2), ("svdquant_ops.meta", 2),
    ("svdquant_ops.quantize", 3),
    ("svdquant_ops.integrations", 4), ("svdquant_ops.lora", 4),  # the latter: the LoRA facade
    ("svdquant_ops.nunchaku", 4),  # the Nunchaku import facade
]
NAMES = ["formats/packing", "storage", "ops", "algorithm", "integrations"]


def _layer(module: str) -> int | None:
    return next((lvl for prefix, lvl in LAYERS if module == prefix or module.startswith(prefix + ".")), None)


def _module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Every svdquant_ops module -> the svdquant_ops modules it imports (top level or inside functions)."""
    graph = {}
    for path in sorted(PKG.rglob("*.py")):
        if PKG / "csrc" in path.parents:  # build scripts (the wgmma wrapper generator), not modules
            continue
        name = _module_name(path)
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("svdquant_ops")}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target.startswith("svdquant_ops"):
                    # "from . import meta" names a module; "from .x import y" names x
                    subs = [f"{target}.{a.name}" for a in node.names]
                    deps |= {s for s in subs if (PKG.parent / s.replace(".", "/")).with_suffix(".py").exists()
                             or (PKG.parent / s.replace(".", "/") / "__init__.py").exists()} or {target}
        graph[name] = deps - {name}
    return graph


def test_imports_point_down_the_data_flow():
    bad = []
    for mod, deps in import_graph().items():
        if mod == "svdquant_ops":  # the package facade re-exports every layer
            continue
        lvl = _layer(mod)
        assert lvl is not None, f"{mod} belongs to no layer: add it to LAYERS"
        for dep in deps:
            dep_lvl = _layer(dep)
            if dep != "svdquant_ops" and dep_lvl is not None and dep_lvl > lvl:
                bad.append(f"{mod} ({NAMES[lvl]}) imports {dep} ({NAMES[dep_lvl]})")
            if dep == "svdquant_ops" and lvl < 4:
                bad.append(f"{mod} imports the package facade")
    assert bad == []


def _run(code: str, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "SVDQUANT_OPS_CACHE": str(cache)}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                          cwd=PKG.parent)


def test_import_compiles_nothing(tmp_path):
    r = _run("import svdquant_ops, svdquant_ops.formats; from svdquant_ops import SVDQuantConfig, quantize_model",
             tmp_path)
    assert r.returncode == 0, r.stderr
    assert "compiling" not in r.stderr
    assert not any(tmp_path.iterdir())  # no build directory was created


def test_loading_and_running_a_saved_model_imports_storage_and_ops_only():
    fixtures = Path(__file__).parent / "fixtures"
    code = f"""
import sys, torch, torch.nn.functional as F
import svdquant_ops
from safetensors.torch import load_file
sd = svdquant_ops.load_file({str(fixtures / "layout1.safetensors")!r})
x = load_file({str(fixtures / "layout1_expected.safetensors")!r})["x"]
y = F.linear(x, sd["w4a8.weight"], sd["w4a8.bias"])
print(sorted(m for m in sys.modules if m.startswith("svdquant_ops.")))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=PKG.parent)
    assert r.returncode == 0, r.stderr
    loaded = eval(r.stdout.strip().splitlines()[-1])
    assert [m for m in loaded if _layer(m) is None or _layer(m) > 2] == []


def test_saved_diffusers_model_loads_after_a_plain_import(tmp_path):
    """config.json names SVDQuantConfig: a fresh process that only ran `import svdquant_ops` loads the model."""
    save = """
import svdquant_ops, sys
sys.path.insert(0, "tests")
from builders import tiny_flux
m = tiny_flux()
svdquant_ops.quantize_model(m, precision="w4a8", rank=8)
m.save_pretrained(sys.argv[1])
"""
    load = """
import sys, svdquant_ops
from diffusers import FluxTransformer2DModel
m = FluxTransformer2DModel.from_pretrained(sys.argv[1])
print(type(m.transformer_blocks[0].attn.to_q.weight).__name__)
"""
    for code in (save, load):
        r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=600,
                           cwd=PKG.parent)
        assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "SVDQuantTensor"
