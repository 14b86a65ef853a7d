"""The install is one package, ``symmim``: its wheel, its console scripts, and imports that point down."""
from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("symmim-pretrain", "symmim-knn", "symmim-linprobe", "symmim-finetune", "symmim-export",
           "symmim-verify-data", "symmim-make-shards")
FOLDERS = ("core", "kernels", "data", "launch", "benchmarks")


def _imports(path: Path) -> set[str]:
    """The modules ``path`` imports (absolute names), at any depth of the file."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def test_the_wheel_holds_one_top_level_package_with_the_presets(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path),
                    str(ROOT)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("symmim-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"symmim", wheel.name.split("-py")[0] + ".dist-info"}
    for folder in FOLDERS:
        assert f"symmim/{folder}/__init__.py" in names
    assert "symmim/configs/tiny_cpu.yaml" in names and "symmim/kernels/attention.py" in names
    assert not any(n.startswith("symmim/tests/") for n in names)


def test_nothing_named_core_is_importable_outside_the_checkout(tmp_path):
    """From another folder only ``symmim.*`` imports (inside the checkout, Python's own rule makes
    every folder of the working directory importable)."""
    code = "import importlib.util as u, symmim.core.config; print(u.find_spec('core'), u.find_spec('data'))"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["None", "None"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_console_scripts_answer_help(script):
    path = shutil.which(script)
    assert path, f"{script} is not installed (pip install -e .)"
    proc = subprocess.run([path, "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: " + script), proc.stderr[-2000:]


def test_the_module_form_runs():
    proc = subprocess.run([sys.executable, "-m", "symmim.launch.pretrain", "--help"], cwd=Path("/"),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--config" in proc.stdout, proc.stderr[-2000:]


@pytest.mark.parametrize("folder", FOLDERS)
def test_no_path_hacks(folder):
    for path in (ROOT / folder).rglob("*.py"):
        text = path.read_text()
        assert "sys.path" not in text and "noqa: E402" not in text, path


def test_imports_point_down():
    """kernels and data import nothing of the other folders; core nothing from launch or benchmarks."""
    forbidden = {"kernels": ("symmim.core", "symmim.data", "symmim.launch", "symmim.benchmarks"),
                 "data": ("symmim.core", "symmim.kernels", "symmim.launch", "symmim.benchmarks"),
                 "core": ("symmim.launch", "symmim.benchmarks")}
    for folder, above in forbidden.items():
        for path in (ROOT / folder).rglob("*.py"):
            bad = {m for m in _imports(path) if m.startswith(above)}
            if folder == "data":  # type hints of the config sections, never imported at run time
                bad -= {"symmim.core.config"}
            assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"
