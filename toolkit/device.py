"""The device and precision policy, measured rather than assumed, and the
provenance a result row carries (machine, numeric path, code version)."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Mapping

import torch

from toolkit.settings import ConfigError, DeviceSettings, importable


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX (x86), or the bf16 feature (ARM): what torch reports,
    else the CPU's own flags. Native is not the same as fast: see `bf16_matmul_speedup`."""
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        check = getattr(torch.cpu, name, None)
        if check is not None and check():
            return True
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16", "bf16"})


@functools.lru_cache(maxsize=None)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        return frozenset(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return frozenset()


# The features that pick a CPU's float and bf16 kernels: VMs often report one
# model name ("Intel(R) Xeon(R) Processor") for CPUs that differ here.
NUMERIC_FEATURES = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "bf16")


def cpu_features() -> str:
    return " ".join(f for f in NUMERIC_FEATURES if f in cpu_flags())


@functools.lru_cache(maxsize=None)
def bf16_matmul_speedup(threads: int | None = None, rounds: int = 5) -> float:
    """fp32 / bf16 time of a decoder-sized matmul on this CPU, best of a few
    (about 0.1 s). Native bf16 instructions do not make bf16 faster by
    themselves: on one AVX512-BF16 machine without AMX it ran at half the fp32
    speed of MKL, so the policy measures instead of trusting the flag. The two
    are timed in turns: timed one after the other, a load that came or went
    between them (another sweep on the machine) once read a 2.7x machine as
    below 1.2x, and so flipped a slice's numeric path and its keys."""
    import timeit

    previous = torch.get_num_threads()
    torch.set_num_threads(threads or previous)
    try:
        # Its own generator: the global one is seeded for the run, and the first
        # measurement in a process would otherwise shift that run's LoRA init.
        generator = torch.Generator().manual_seed(0)
        x, w = torch.randn(256, 576, generator=generator), torch.randn(1536, 576, generator=generator)
        xb, wb = x.bfloat16(), w.bfloat16()
        fp32, bf16 = math.inf, math.inf
        for _ in range(rounds):
            fp32 = min(fp32, timeit.timeit(lambda: x @ w.t(), number=3))
            bf16 = min(bf16, timeit.timeit(lambda: xb @ wb.t(), number=3))
    finally:
        torch.set_num_threads(previous)
    return fp32 / bf16


BF16_MIN_SPEEDUP = 1.2  # below this, autocast's casts eat the gain


@dataclass(frozen=True)
class Capabilities:
    """What the machine offers; detected, or given by tests to drive each branch."""

    cuda: bool
    flash_attn: bool
    triton: bool
    cpu_bf16: bool = False  # the CPU computes bf16 natively, and faster than fp32 (measured)

    @classmethod
    def detect(cls) -> "Capabilities":
        cuda = torch.cuda.is_available()
        # Measured on GPU machines too: device.device=cpu there (a CPU benchmark, say) still gets the CPU's policy.
        fast_bf16 = cpu_has_native_bf16() and bf16_matmul_speedup() >= BF16_MIN_SPEEDUP
        return cls(cuda=cuda, flash_attn=cuda and importable("flash_attn"), triton=cuda and importable("triton"),
                   cpu_bf16=fast_bf16)


@dataclass(frozen=True)
class DevicePolicy:
    device: str
    dtype: torch.dtype  # weights (and optimizer state)
    attn_implementation: str
    triton_lion: bool
    autocast_dtype: torch.dtype | None = None  # mixed precision: matmuls in this dtype, weights stay `dtype`

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device, dtype=self.autocast_dtype)


def cpu_model() -> str:
    """The CPU's model name (Linux), else what the platform module knows."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.lru_cache(maxsize=None)
def code_version() -> str:
    """The project's git commit ("+dirty" when files differ from it); "" outside a checkout."""
    import subprocess

    root = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
    return commit + ("+dirty" if commit and dirty else "")


def provenance(policy: DevicePolicy) -> dict:
    """Which machine and numeric path produced a result row: results from
    several machines mix openly, and bf16 autocast is on where the CPU
    computes bf16 fast, so two machines can take different steps."""
    return {"machine_cpu": cpu_model(), "machine_cpu_features": cpu_features(),
            "machine_threads": torch.get_num_threads(),
            "machine_gpu": torch.cuda.get_device_name() if policy.device == "cuda" else "",
            "torch_version": torch.__version__, "device": policy.device,
            "dtype": str(policy.dtype).removeprefix("torch."), "bf16_autocast": policy.autocast_dtype is not None,
            "code_version": code_version()}


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
AUTO = "auto"


def resolve_device_policy(settings: DeviceSettings | Mapping | None = None, caps: Capabilities | None = None) -> DevicePolicy:
    """CUDA: bf16 weights, flash-attention 2 if it imports (else sdpa), Triton
    Lion if triton imports. CPU: fp32 weights and optimizer state, sdpa, plain
    Lion, and bf16 autocast where the CPU computes bf16 natively and faster
    than fp32. Each key can be forced in `device.*`."""
    if isinstance(settings, DeviceSettings):
        settings = dataclasses.asdict(settings)
    given = {k: v for k, v in (settings or {}).items() if v is not None}
    checked = {f.name: f.metadata["allowed"].check(given.get(f.name, AUTO), f"device.{f.name}")
               for f in fields(DeviceSettings)}
    caps = caps or Capabilities.detect()
    device = ("cuda" if caps.cuda else "cpu") if checked["device"] == AUTO else checked["device"]
    if device == "cuda" and not caps.cuda:
        raise ConfigError("device.device='cuda' was asked for but CUDA is not available; use 'cpu' or 'auto'")
    on_gpu = device == "cuda"
    dtype = ("bfloat16" if on_gpu else "float32") if checked["dtype"] == AUTO else checked["dtype"]
    attn = checked["attn_implementation"]
    attn = ("flash_attention_2" if on_gpu and caps.flash_attn else "sdpa") if attn == AUTO else attn
    if attn == "flash_attention_2" and not (on_gpu and caps.flash_attn):
        raise ConfigError("device.attn_implementation='flash_attention_2' needs CUDA and the flash_attn package")
    triton = (on_gpu and caps.triton) if checked["triton_lion"] == AUTO else checked["triton_lion"]
    if triton and not (on_gpu and caps.triton):
        raise ConfigError("device.triton_lion=true needs CUDA and the triton package")
    # Mixed precision is the CPU's half of the policy: on CUDA the weights are already bf16.
    autocast = (not on_gpu and caps.cpu_bf16) if checked["bf16_autocast"] == AUTO else checked["bf16_autocast"]
    autocast = autocast and DTYPES[dtype] == torch.float32
    return DevicePolicy(device, DTYPES[dtype], attn, triton, torch.bfloat16 if autocast else None)
