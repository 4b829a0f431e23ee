"""Fused fp32 CPU kernels (cpu_kernels.cpp): RMSNorm, adaLN's modulated RMSNorm, and RMSNorm + RoPE
for q/k, each one pass per row with a C++ backward. They serve CPU training only (blocks.py uses them for fp32 tensors outside
CUDA and torch.compile); the PyTorch formulas in blocks.py stay the reference and the fallback.

The source is compiled on first use with the machine's C++ compiler (~30 s; `make setup` does it
ahead: `python -m lflm_dist.models.cpu_kernels`) and cached under ~/.cache/lflm_dist/kernels
(LFLM_KERNEL_CACHE), keyed by a hash of the source, flags, torch and Python versions. Each build
runs in a private directory and is moved into the cache atomically, so concurrent ranks never
wait on each other's lock (torch's own cache lock is left behind by a killed build and then
blocks every later start). Without a compiler, or with LFLM_CPU_KERNELS=0, the PyTorch ops run
instead (one warning on failure)."""
from __future__ import annotations

import contextlib
import hashlib
import importlib.machinery
import importlib.util
import os
import platform
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
FLAGS = ["-O3", "-fopenmp"]  # OpenMP: at::parallel_for is inline and runs serially without it
_module = None
_tried = False


def cache_dir() -> Path:
    return Path(os.environ.get("LFLM_KERNEL_CACHE", Path.home() / ".cache" / "lflm_dist" / "kernels"))


def _name() -> str:
    key = hashlib.sha1(SOURCE.read_bytes())
    for part in (*FLAGS, torch.__version__, sys.version, platform.machine()):
        key.update(part.encode())
    return "lflm_cpu_kernels_" + key.hexdigest()[:12]


def _import(name: str, path: Path):
    loader = importlib.machinery.ExtensionFileLoader(name, str(path))
    spec = importlib.util.spec_from_file_location(name, path, loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def build(verbose: bool = False):
    """Compile (or find in the cache) and import the kernels; raises on failure."""
    from torch.utils import cpp_extension
    name = _name()
    cache = cache_dir()
    target = cache / f"{name}.so"
    if target.exists():
        return _import(name, target)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{name}.build.", dir=cache))
    try:
        module = cpp_extension.load(name, [str(SOURCE)], extra_cflags=FLAGS, build_directory=str(tmp),
                                    verbose=verbose)
        os.replace(tmp / f"{name}.so", target)
        return module
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def get():
    """The kernels' module, or None (disabled, or the build failed: warned once)."""
    global _module, _tried
    if not _tried:
        _tried = True
        if os.environ.get("LFLM_CPU_KERNELS", "1") != "0":
            try:
                _module = build()
            except Exception as e:  # no compiler, missing headers, ...: the PyTorch ops still work
                warnings.warn(f"lflm_dist: the fused CPU kernels ({SOURCE}) did not build, so CPU training "
                              f"uses the slower PyTorch ops ({type(e).__name__}: {str(e).strip()[-500:]}). "
                              "Set LFLM_CPU_KERNELS=0 to skip the build.", RuntimeWarning, stacklevel=2)
    return _module


@contextlib.contextmanager
def disabled():
    """Within: the PyTorch ops run as if the kernels had not built (tests and benchmarks compare)."""
    global _module, _tried
    saved = _module, _tried
    _module, _tried = None, True
    try:
        yield
    finally:
        _module, _tried = saved


def applies(*tensors: torch.Tensor) -> bool:
    """Whether the kernels take these tensors: plain (not DTensor or other subclasses) fp32 CPU
    tensors outside torch.compile, with the kernels built."""
    for t in tensors:
        if t.dtype != torch.float32 or t.device.type != "cpu" or type(t) not in (torch.Tensor, torch.nn.Parameter):
            return False
    return not torch.compiler.is_compiling() and get() is not None


def main() -> None:
    import argparse
    argparse.ArgumentParser(description="Build (or find in the cache) lflm_dist's fused CPU kernels and "
                            "print where they are. `make setup` runs this so the first training run "
                            "does not pay the ~30 s compile.").parse_args()
    try:
        build(verbose=False)
    except Exception as e:
        print(f"fused CPU kernels: not built ({type(e).__name__}); CPU training will use PyTorch ops: {e}")
        return
    print(f"fused CPU kernels: {cache_dir() / (_name() + '.so')}")


if __name__ == "__main__":
    main()
