"""Model FLOPs utilisation: achieved training FLOP/s over the devices' dense peak.

GPU peaks are the vendor's dense (not 2:4-sparse) figures for the training dtype. On CPU
the peak is measured: the best of a few matmuls in the training dtype (a CPU with AVX512-BF16
or AMX runs bf16 matmuls 2-3x faster than fp32, so an fp32 peak would put bf16 MFU above 1) with
this process's thread count. Each run measures again (~0.1 s) and keeps the best rate ever seen
in ~/.cache/lflm_dist/cpu_peak.json (keyed by CPU model, threads and dtype): a measurement taken
while another process loads the cores reads low, and a peak that only keeps the first measurement
would keep that low value and inflate every later MFU."""
from __future__ import annotations

import json
import os
import platform
import resource
import time
from pathlib import Path

import torch

# dense peak FLOP/s by (device-name substring, dtype)
GPU_PEAK = {
    ("H200", "bf16"): 989e12, ("H100", "bf16"): 989e12, ("H100", "fp32"): 67e12, ("H200", "fp32"): 67e12,
    ("A100", "bf16"): 312e12, ("A100", "fp32"): 19.5e12, ("L40S", "bf16"): 362e12, ("A10", "bf16"): 125e12,
}
CACHE = Path(os.environ.get("LFLM_CACHE", Path.home() / ".cache" / "lflm_dist")) / "cpu_peak.json"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def measure_cpu_peak(n: int = 1024, reps: int = 5, dtype: torch.dtype = torch.float32) -> float:
    # a private generator: the trainer measures after seeding, and the run's random stream must not
    # depend on whether (or how often) a peak was measured
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, dtype=dtype, generator=g), torch.randn(n, n, dtype=dtype, generator=g)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def cpu_peak(bf16: bool = False) -> float:
    key = f"{_cpu_name()}|threads={torch.get_num_threads()}|torch={torch.__version__}" + ("|bf16" if bf16 else "")
    try:
        cache = json.loads(CACHE.read_text())
    except (OSError, ValueError):
        cache = {}
    now = measure_cpu_peak(dtype=torch.bfloat16 if bf16 else torch.float32)
    if now > cache.get(key, 0.0):
        cache[key] = now
        try:
            CACHE.parent.mkdir(parents=True, exist_ok=True)
            tmp = CACHE.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(cache, indent=1))
            os.replace(tmp, CACHE)
        except OSError:
            pass
    return cache[key]


def device_peak(device: torch.device, bf16: bool) -> float:
    """Dense peak FLOP/s of one device for the training dtype (0 when unknown)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for (k, dt), v in GPU_PEAK.items():
            if k in name and dt == ("bf16" if bf16 else "fp32"):
                return v
        return 0.0
    return cpu_peak(bf16)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
