"""`prune-ofa env`: the report on this machine (CPU torch, no GPU), a library missing or broken, and the
fix lines it gives for the machines it cannot see from here (a GPU node with a CPU torch, an old driver,
a V100, no nvcc), read from synthetic reports."""
import contextlib
import importlib.abc
import importlib.machinery
import io
import json
import os
import sys
from pathlib import Path

import pytest
import torch

from launcher import cli, env_report

ROOT = Path(__file__).resolve().parents[3]
TORCH_PIN = env_report.pins()["torch"]     # what the fix lines install
CPU_TORCH = pytest.mark.skipif(torch.version.cuda is not None, reason="asserts what a CPU build of torch reports")


def run_cli(*argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(["env", *argv])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def here():
    """One real report of this machine, through the CLI, as JSON, with --require-gpu."""
    code, out, err = run_cli("--json", "--require-gpu")
    return code, json.loads(out), err


@CPU_TORCH
def test_here_is_a_cpu_build_without_gpu_and_require_gpu_says_so(here):
    code, report, err = here
    assert set(report) >= {"python", "platform", "torch", "driver", "libraries", "deepspeed", "toolchain", "slurm",
                           "assets", "usable_gpu", "no_gpu_reason", "fixes"}
    assert report["torch"]["version"] == torch.__version__ and report["torch"]["build"] == "CPU"
    assert report["usable_gpu"] is False
    assert code == 1 and f"no usable GPU: torch {torch.__version__} is a CPU build" in err
    pin = env_report.pins()["torch"]
    assert any(f"pip uninstall -y torch && pip install torch=={pin} --index-url "
               f"https://download.pytorch.org/whl/cu130" in fix for fix in report["fixes"])


def test_libraries_and_deepspeed_ops_are_reported(here):
    _, report, _ = here
    import importlib.metadata
    assert report["libraries"]["transformers"]["version"] == importlib.metadata.version("transformers")
    ds = report["deepspeed"]
    assert ds["installed"] and ds["version"] == importlib.metadata.version("deepspeed")
    assert ds["ops"] and all(set(op) == {"installed", "compatible"} for op in ds["ops"].values())


@CPU_TORCH
def test_text_report_says_cpu_build_and_how_to_fix(here):
    text = env_report.format_text(here[1])
    assert f"torch .............. {torch.__version__}, CPU build" in text
    assert f"Usable GPU: no: torch {torch.__version__} is a CPU build" in text
    assert "Missing, and how to fix it:\n  1. torch" in text


def test_the_report_exits_0_and_require_gpu_1_only_without_a_usable_gpu(here, monkeypatch):
    report = here[1]
    monkeypatch.setattr(env_report, "collect", lambda: report)
    assert run_cli()[0] == 0
    assert run_cli("--require-gpu")[0] == (0 if report["usable_gpu"] else 1)
    monkeypatch.setattr(env_report, "collect", lambda: dict(report, usable_gpu=True, no_gpu_reason=None))
    assert run_cli("--require-gpu")[0] == 0


class _Broken(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``deepspeed`` and fails to import it, as a DeepSpeed built for another torch does."""
    def find_spec(self, name, path=None, target=None):
        return importlib.machinery.ModuleSpec(name, self) if name == "deepspeed" else None

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        raise RuntimeError("built for another torch")


def test_a_missing_or_broken_library_is_reported_not_raised(monkeypatch):
    for name in ("torch", "transformers"):
        monkeypatch.setitem(sys.modules, name, None)         # `import torch` fails: not installed
    monkeypatch.delitem(sys.modules, "deepspeed", raising=False)
    monkeypatch.setattr(sys, "meta_path", [_Broken(), *sys.meta_path])
    report = env_report.collect()
    assert report["torch"] == {"installed": False}
    assert report["libraries"]["transformers"]["importable"] is False
    assert report["deepspeed"] == {"error": "RuntimeError: built for another torch"}
    assert report["usable_gpu"] is False and report["no_gpu_reason"] == "torch is not installed"
    fixes = "\n".join(report["fixes"])
    assert "torch: not installed: pip install torch==" in fixes
    pin = env_report.pins()["transformers"]
    assert f"transformers is missing (models and tokenizers): pip install transformers=={pin}" in fixes
    assert "deepspeed fails to import (RuntimeError: built for another torch): DS_BUILD_OPS=0 pip install" in fixes
    text = env_report.format_text(report)
    assert "torch .............. MISSING" in text and "transformers ....... MISSING" in text


# -- fix lines for machines this one is not, from synthetic reports ------------------------------------------
def gpu_node(torch_build="CUDA 13.0", driver_cuda="13.0", gpus=(("NVIDIA H100 80GB HBM3", "9.0"),),
             arch_list=("sm_80", "sm_90", "sm_100", "compute_100"), nvcc="13.0"):
    """The whole report of a GPU node: torch of ``torch_build`` (CUDA x.y or CPU), a driver that runs
    ``driver_cuda``, these GPUs (name, compute capability), nvcc of that CUDA release (None: no nvcc)."""
    cuda = torch_build.split()[1] if torch_build.startswith("CUDA") else None
    seen = [{"index": i, "name": name, "memory_gib": 79.2, "capability": cap} for i, (name, cap) in enumerate(gpus)]
    usable = cuda is not None and tuple(map(int, driver_cuda.split("."))) >= tuple(map(int, cuda.split(".")))
    t = {"installed": True, "version": "2.13.0" if cuda else "2.13.0+cpu", "build": torch_build, "cuda": cuda,
         "hip": None, "path": "/venv/torch", "cudnn": 91000 if cuda else None, "nccl": "2.29.7" if cuda else None,
         "cuda_available": usable, "device_count": len(seen) if usable else 0,
         "arch_list": list(arch_list) if cuda else [], "cuda_visible_devices": None, "cuda_warning": None}
    if usable:
        t["gpus"] = [dict(g, bf16=int(g["capability"][0]) >= 8, tf32=int(g["capability"][0]) >= 8,
                          kernels=env_report._has_kernels(t["arch_list"], *map(int, g["capability"].split("."))))
                     for g in seen]
    report = {"prune_ofa": "0.1.0", "python": {"version": "3.12.3", "executable": "/venv/bin/python",
                                               "virtualenv": True},
              "platform": {"system": "Linux", "machine": "x86_64", "host": "gpu01", "cpus": 64},
              "torch": t, "driver": {"version": "580.65.06", "cuda": driver_cuda, "gpus": seen},
              "libraries": {}, "assets": {}, "slurm": {"sbatch": "/usr/bin/sbatch", "srun": None, "job": {}},
              "deepspeed": {"installed": True, "version": "0.19.8", "pinned": "0.19.8", "accelerator": "cuda",
                            "built_for": "cuda", "built_with_torch": "0.0", "built_with_cuda": "0.0",
                            "ops": {"fused_adam": {"installed": False, "compatible": True}}},
              "toolchain": {"nvcc": "/usr/local/cuda/bin/nvcc" if nvcc else None, "nvcc_release": nvcc,
                            "cuda_home": "/usr/local/cuda" if nvcc else None, "cuda_headers": bool(nvcc),
                            "cuda_toolkits": [], "ninja": "/venv/bin/ninja", "venv_ninja": "/venv/bin/ninja",
                            "torch_cuda_arch_list": None, "torch_extensions_dir": None}}
    report["usable_gpu"], report["no_gpu_reason"] = env_report.usable_gpu(report)
    report["fixes"] = env_report.fixes(report)
    return report


@pytest.mark.parametrize("driver_cuda, fix", [
    ("13.0", f"pip uninstall -y torch && pip install torch=={TORCH_PIN} --index-url https://download.pytorch.org/whl/cu130"),
    ("12.9", "--index-url https://download.pytorch.org/whl/cu128"),
    ("12.6", "--index-url https://download.pytorch.org/whl/cu126"),
    ("12.2", "upgrade the NVIDIA driver (it runs CUDA 12.2; torch needs CUDA 12.6 or newer)")])
def test_a_cpu_torch_on_a_gpu_node_gets_the_cuda_build_its_driver_runs(driver_cuda, fix):
    report = gpu_node(torch_build="CPU", driver_cuda=driver_cuda, gpus=[("NVIDIA H100", "9.0")] * 8)
    assert report["no_gpu_reason"] == "torch 2.13.0+cpu is a CPU build"
    first = report["fixes"][0]
    assert first.startswith("torch 2.13.0+cpu is a CPU build this node has 8 NVIDIA GPU(s): ") and fix in first


def test_a_gpu_node_that_has_everything_needs_nothing():
    report = gpu_node()
    assert report["usable_gpu"] and report["fixes"] == []
    text = env_report.format_text(report)
    assert "0: NVIDIA H100 80GB HBM3, 79.2 GiB, compute capability 9.0, bf16 yes, TF32 yes" in text
    assert "Usable GPU: yes" in text and text.endswith("Nothing missing.\n")


def test_an_old_driver_a_v100_a_new_gpu_and_missing_nvcc_each_get_their_line():
    old_driver = env_report.fixes(gpu_node(driver_cuda="12.8"))
    assert old_driver == ["the NVIDIA driver 580.65.06 runs CUDA <= 12.8, torch 2.13.0 needs CUDA 13.0: pip uninstall "
                          f"-y torch && pip install torch=={TORCH_PIN} --index-url https://download.pytorch.org/whl/cu128"]
    v100 = env_report.fixes(gpu_node(gpus=[("Tesla V100-SXM2-32GB", "7.0")], arch_list=["sm_70", "sm_90"]))
    assert v100 == ["GPU 0 (Tesla V100-SXM2-32GB, compute capability 7.0) has no bf16 (it would be emulated, "
                    "slowly), nor TF32: run every stage with training.precision=fp32"]
    too_new = gpu_node(gpus=[("NVIDIA B200", "12.0")], arch_list=["sm_80", "sm_90"])
    assert too_new["usable_gpu"] is False and "no kernels" in env_report.fixes(too_new)[0]
    assert gpu_node(gpus=[("NVIDIA B200", "12.0")], arch_list=["sm_90", "compute_90"])["usable_gpu"]   # PTX
    assert gpu_node(gpus=[("NVIDIA L40S", "8.9")], arch_list=["sm_80", "sm_90"])["usable_gpu"]  # sm_80 runs on 8.9
    no_nvcc = env_report.fixes(gpu_node(nvcc=None))
    assert len(no_nvcc) == 1 and no_nvcc[0].startswith("no nvcc: DeepSpeed cannot JIT-build its CUDA ops here")
    assert no_nvcc[0].endswith("DS_BUILD_FUSED_ADAM=1 DS_BUILD_CPU_ADAM=1 pip install --no-build-isolation "
                               "--force-reinstall --no-deps deepspeed==0.19.8")
    prebuilt = gpu_node(nvcc=None)
    prebuilt["deepspeed"]["ops"] = {op: {"installed": True, "compatible": False} for op in ("fused_adam", "cpu_adam")}
    assert env_report.fixes(prebuilt) == []            # what JIT would have built is there already
    no_headers = gpu_node()
    no_headers["toolchain"].update(cuda_home="/usr/local", cuda_headers=False, cuda_toolkits=["/usr/local/cuda-13.0"])
    assert env_report.fixes(no_headers) == ["CUDA_HOME /usr/local (where torch's JIT builds look) has no "
                                            "include/cuda_runtime.h: export CUDA_HOME=/usr/local/cuda-13.0"]
    other_major = env_report.fixes(gpu_node(nvcc="12.4"))
    assert other_major and "nvcc /usr/local/cuda/bin/nvcc is CUDA 12.4, torch is built with CUDA 13.0" in other_major[0]


def test_torch_index_url_follows_the_driver(monkeypatch):
    monkeypatch.setattr(env_report, "driver_section", lambda: {"cuda": "12.8", "gpus": []})
    assert run_cli("--torch-index-url")[:2] == (0, "https://download.pytorch.org/whl/cu128\n")
    monkeypatch.setattr(env_report, "driver_section", lambda: {"cuda": "11.8", "gpus": []})
    code, out, err = run_cli("--torch-index-url")
    assert code == 1 and out == "" and "older than every CUDA build of torch" in err


def test_what_a_probe_prints_goes_to_stderr_so_json_stays_json(capfd):
    with env_report._stdout_to_stderr():
        print("from python")
        os.write(1, b"from a compiler\n")
    out, err = capfd.readouterr()
    assert out == "" and "from python" in err and "from a compiler" in err


def test_offline_asset_pins_are_the_makefiles():
    makefile = (ROOT / "Makefile").read_text()
    for dist, (version, _) in env_report.OFFLINE_ASSETS.items():
        assert f"--no-deps {dist}=={version}" in makefile
