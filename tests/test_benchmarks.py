"""The benchmark scripts run end to end (``--quick``) and write their JSON record and PNG chart."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run_quick(script: str, tmp_path: Path, *args: str) -> dict:
    """Run ``benchmarks/<script>.py --quick --json ...`` from the repo root; its JSON record."""
    out = tmp_path / f"{script}.json"
    proc = subprocess.run([sys.executable, f"benchmarks/{script}.py", "--quick", "--json", str(out), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert out.with_suffix(".png").stat().st_size > 0
    record = json.loads(out.read_text())
    assert record["benchmark"] == script and record["env"]["device"] and record["rows"]
    return record


def test_kernels_quick(tmp_path):
    record = _run_quick("kernels", tmp_path)
    assert {r["kernel"] for r in record["rows"]} == {"attention", "patch-embed", "norm-pix loss", "layernorm"}
    for row in record["rows"]:
        assert row["eager_ms"] > 0 and row["triton_ms"] > 0 and row["triton_x_eager"] > 0, row
        if row["kernel"] == "attention":
            assert row["sdpa_ms"] > 0 and row["triton_x_sdpa"] > 0 and row["triton_TFLOP/s"] > 0, row
    # patch-embed x2 masks, loss, attention at half and all patches visible
    assert len(record["targets"]) == 5 and all(isinstance(t["met"], bool) for t in record["targets"])


def test_kernels_refuses_bf16_on_cpu():
    proc = subprocess.run([sys.executable, "benchmarks/kernels.py", "--quick", "--dtype", "bf16", "--device", "cpu"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "bf16" in proc.stderr


def test_dataloader_quick(tmp_path, embedded_cache):
    record = _run_quick("dataloader", tmp_path, "--cache-dir", str(embedded_cache))
    assert len(record["rows"]) == 2  # photo-like JPEGs and the embedded set
    dali = importlib.util.find_spec("nvidia.dali") is not None
    for row in record["rows"]:
        assert row["torch_img_s"] > 0, row
        if dali:
            assert row["dali_img_s"] > 0 and row["dali_over_torch"] > 0, row


def test_gpu_check_dry_run(tmp_path):
    """The GPU machine's script runs all its steps at tiny shapes on CPU and writes its files."""
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry-run"], cwd=ROOT, capture_output=True, text=True,
                          timeout=900, env={**os.environ, "OUT": str(tmp_path)})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "gpu_check: all steps passed" in proc.stdout
    for name in ("gpu_check.log", "gpu_kernels.json", "gpu_kernels.png", "gpu_throughput.json", "gpu_throughput.png",
                 "gpu_throughput_zero0.json", "gpu_throughput_triton_all.json"):
        assert (tmp_path / name).stat().st_size > 0, name
    record = json.loads((tmp_path / "gpu_throughput.json").read_text())
    assert {(r["variant"], r["system"]) for r in record["rows"]} == {
        (v, s) for v in ("symmim", "random75") for s in ("optimized", "reference")}
    assert "partial" not in record and not record["failed"]
    for row in record["rows"]:
        assert row["img_per_s"] > 0 and row["gflop_per_img"] > 0 and abs(sum(row["split"].values()) - 1) < 1e-6
        assert row["profile"]["ops"] and all(op["ms_per_step"] >= 0 for op in row["profile"]["ops"]), row["profile"]
    assert record["ratios"]["symmim_vs_random75_flops"] > 1
    assert {r["backends"] for r in record["rows"]} == {"kernels: ops=torch attention=sdpa layernorm=torch",
                                                      "kernels: ops=torch attention=torch layernorm=torch"}
    triton = json.loads((tmp_path / "gpu_throughput_triton_all.json").read_text())
    assert {r["system"] for r in triton["rows"]} == {"optimized"}
    assert {r["backends"] for r in triton["rows"]} == {"kernels: ops=torch attention=sdpa layernorm=triton"}  # dry run


def test_throughput_records_a_failed_run_and_measures_the_others(tmp_path):
    """xformers is not installed: the optimized runs fail to build and are recorded as failed; the
    reference runs (eager attention) are still measured; exit code 1; ratios that need a failed run are None."""
    out = tmp_path / "t.json"
    proc = subprocess.run([sys.executable, "benchmarks/throughput.py", "--quick", "--profile-steps", "0", "--json", str(out),
                           "--set", "kernels.attention=xformers"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads(out.read_text())
    assert {(f["variant"], f["system"]) for f in record["failed"]} == {("symmim", "optimized"), ("random75", "optimized")}
    assert all("xformers" in f["error"] for f in record["failed"])
    assert {(r["variant"], r["system"]) for r in record["rows"]} == {("symmim", "reference"), ("random75", "reference")}
    assert record["ratios"]["symmim_opt_vs_ref_speedup"] is None and record["targets"]["symmim_mfu_at_least_45pct"] is None


def test_a_failed_kernel_case_misses_its_target():
    from symmim.benchmarks.kernels import mark_targets

    rows = [{"kernel": "patch-embed", "model": "ViT-B", "shape": "random 75%", "pass": "error", "error": "boom"},
            {"kernel": "norm-pix loss", "model": "any", "shape": "s", "pass": "fwd+bwd", "triton_x_eager": 3.5}]
    targets = mark_targets(rows, "ViT-B", [])
    assert [(t["measured"], t["met"]) for t in targets] == [(None, False), (3.5, True)]
