"""Facts about the machine that every benchmark figure must carry (CPU model and ISA, versions)."""

from __future__ import annotations

import functools
import platform
import subprocess
from importlib import metadata
from pathlib import Path

#: ISA features that change which kernels run: int8 dot products (VNNI), native bf16, AMX tiles.
_ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_isa() -> list[str]:
    """The ISA features among :data:`_ISA_FLAGS` this CPU has, e.g. ``['avx2', 'avx512f', 'avx512_vnni']``."""
    return [flag for flag in _ISA_FLAGS if flag in cpu_flags()]


def isa_summary() -> str:
    """One word for tables: AMX, AVX512-VNNI, AVX512, AVX2 or the machine name."""
    flags = cpu_flags()
    if "amx_tile" in flags:
        return "AMX"
    if "avx512_vnni" in flags:
        return "AVX512-VNNI"
    if "avx512f" in flags:
        return "AVX512"
    if "avx2" in flags:
        return "AVX2"
    return platform.machine()


def slow_dtype_warning(dtype: str, device: str) -> str | None:
    """Why ``dtype`` on this CPU will be far slower than fp32 (measured here), or None.

    torch emulates bf16 matmul without AVX512-BF16/AMX (~100x slower than fp32 on AVX2 EPYCs), and runs
    fp16 through conversion kernels without AVX512-FP16/AMX-FP16 (3x slower than fp32 on the EPYCs).
    """
    if device != "cpu":
        return None
    if dtype == "bf16" and not native_bf16():
        return "this CPU has no native bf16 (no AVX512-BF16/AMX): torch emulates bf16 matmul, ~100x slower than fp32"
    if dtype == "fp16" and not {"avx512_fp16", "amx_fp16"} & cpu_flags():
        return ("this CPU has no native fp16 (no AVX512-FP16/AMX-FP16): torch converts around each kernel, "
                "~3x slower than fp32; fp16 is a GPU setting")
    return None


def native_bf16() -> bool:
    """True where torch runs bf16 matmul in hardware (AVX512-BF16 or AMX); elsewhere it is emulated."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def package_versions(names=("torch", "diffusers", "transformers", "mlcommons-loadgen", "numpy",
                            "onnxruntime", "open_clip_torch")) -> dict[str, str]:
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    versions["python"] = platform.python_version()
    return versions


def git_commit(repo: Path = Path(__file__).resolve().parent.parent) -> str | None:
    """HEAD of the harness checkout, with ``-dirty`` when there are uncommitted changes."""
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def system_description() -> dict:
    """The block recorded in every ``run.json`` and benchmark JSON."""
    from .devices import gpus

    inventory = gpus()  # not torch.cuda.get_device_name: it would initialise CUDA before forks
    gpu = ", ".join(g["name"] for g in inventory) or None
    return {"cpu_model": cpu_model(), "cpu_isa": cpu_isa(), "isa": isa_summary(), "cpu_count": _cpu_count(),
            "threading": threading_settings(), "gpu": gpu, "platform": platform.platform(), "versions": package_versions(),
            "git_commit": git_commit(), "host": host_facts(inventory)}


def host_facts(inventory: list[dict[str, str]]) -> dict:
    """What a submission's ``systems/<system>.json`` asks of the host and the OS can tell: sockets, clock,
    caches, memory, disk, network cards, GPUs (``inventory``, from :func:`sdxl.devices.gpus`)."""
    import os
    import shutil

    cpuinfo = _read("/proc/cpuinfo")
    sockets = {line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("physical id")}
    max_khz = _read("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq").strip()
    mhz = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("cpu MHz")), "")
    frequency = f"{int(max_khz) // 1000} MHz (max)" if max_khz.isdigit() else (f"{float(mhz):.0f} MHz" if mhz else "")
    mem_kb = next((line.split()[1] for line in _read("/proc/meminfo").splitlines() if line.startswith("MemTotal:")), "")
    try:  # physical or virtio NICs have a device; lo, bridges and veths do not
        cards = sum((card / "device").exists() for card in Path("/sys/class/net").iterdir())
    except OSError:
        cards = None
    try:
        storage = f"{shutil.disk_usage(Path.cwd()).total / 1e9:.0f} GB"  # the disk the run writes to
    except OSError:
        storage = ""
    cores = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("cpu cores")), "")
    return {"cpu_sockets": len(sockets) or 1, "cores_per_socket": int(cores) if cores.isdigit() else os.cpu_count(),
            "cpu_frequency": frequency, "cpu_caches": _cpu_caches(), "memory": f"{int(mem_kb) / 2**20:.1f} GiB" if mem_kb else "",
            "storage": storage, "network_cards": cards,
            "gpus": inventory}


def _cpu_caches() -> str:
    """``L1d 32K, L1i 32K, L2 1024K, L3 32768K (shared by 2 CPUs)`` from sysfs (cpu0's caches)."""
    parts = []
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        level, kind, size = (_read(index / name).strip() for name in ("level", "type", "size"))
        if not (level and size):
            continue
        shared = 0
        for span in _read(index / "shared_cpu_list").strip().split(","):
            low, _, high = span.partition("-")
            shared += int(high or low) - int(low) + 1 if low.isdigit() else 0
        suffix = {"Data": "d", "Instruction": "i"}.get(kind, "")
        parts.append(f"L{level}{suffix} {size}" + (f" (shared by {shared} CPUs)" if shared > 1 else ""))
    return ", ".join(parts)


def _read(path) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def threading_settings() -> dict:
    """torch's intra-op threads and the environment that shapes them: figures depend on both."""
    import os

    import torch

    names = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS", "KMP_BLOCKTIME")
    return {"torch_threads": torch.get_num_threads(), **{name: os.environ.get(name) for name in names}}


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def rss_mb() -> float:
    """This process's resident set size now, in MiB (benchmarks report memory growth with it)."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    """This process's peak resident set size so far, in MiB."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
