"""GPU readings from NVML (package nvidia-ml-py, module `pynvml`) for the servers' metrics ports.

A GpuSampler is made once per server. It initialises NVML once, at construction, and remembers the
outcome: without the pynvml module, without the NVML library (no driver) or without a GPU it is
empty, and every `read()` returns [] at once. A reading that fails for one device (a field the device
does not support, e.g. utilisation on a MIG-enabled GPU) is left out of that sample, and after
GIVE_UP_AFTER failures in a row (at once for NOT_SUPPORTED, or an error that is not NVML's) it is no
longer asked for, so a scrape never waits on a call that keeps failing. Nothing here raises.

Units are Triton's (PROTOCOLS.md 4.3), converted from NVML's: utilisation is 0.0-1.0 (NVML: percent
of the last sample period during which a kernel ran), memory is bytes (NVML v1 memory info: `used`
counts everything not free, reserved memory included), power is watts (NVML: milliwatts, the limit
being the power management limit, as DCGM's POWER_MGMT_LIMIT which Triton reads), and energy is
joules consumed since the sampler started (NVML: millijoules since the driver loaded; a counter that
never goes down, even if the driver's count restarts).

Every GPU NVML lists is sampled; CUDA_VISIBLE_DEVICES is not applied (Triton maps CUDA devices to
DCGM ones by PCI bus id, which needs the CUDA runtime; NVML's order can differ from CUDA's).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, NamedTuple

__all__ = ["GIVE_UP_AFTER", "GpuSample", "GpuSampler"]

GIVE_UP_AFTER = 3
"""Failures in a row after which a reading of one device is no longer asked for."""


class GpuSample(NamedTuple):
    """One device at one moment; a reading that failed (or was given up) is None."""

    uuid: str
    utilization: float | None
    memory_total_bytes: int | None
    memory_used_bytes: int | None
    power_usage_watts: float | None
    power_limit_watts: float | None
    energy_joules: float | None


@dataclass
class _Device:
    """One GPU: its NVML handle, label, failure counts by reading, and the energy counter's state."""

    handle: Any
    uuid: str
    failures: dict[str, int] = field(default_factory=dict)
    last_energy_mj: int | None = None
    energy_j: float = 0.0


class GpuSampler:
    """Every GPU's utilisation, memory, power and energy, read from NVML when `read()` is called.

    Example:
        sampler = GpuSampler()
        for sample in sampler.read():  # [] on a machine without a GPU or without NVML
            print(sample.uuid, sample.utilization, sample.power_usage_watts)
    """

    def __init__(self) -> None:
        self._nvml: ModuleType | None = None
        self._devices: list[_Device] = []
        self.unavailable_reason = ""
        """Why no GPU is sampled ("" when at least one is): no pynvml, no NVML library, no device."""
        try:
            self._nvml = importlib.import_module("pynvml")
            self._nvml.nvmlInit()
        except Exception as exc:  # noqa: BLE001 - ImportError, NVMLError_LibraryNotFound, a driver mismatch
            self._nvml = None
            self.unavailable_reason = f"NVML not available: {type(exc).__name__}: {exc}"
            return
        self._devices = self._find_devices(self._nvml)
        if not self._devices:
            self.unavailable_reason = "NVML lists no GPU"
        for device in self._devices:
            self._energy(device)  # the baseline: energy counts from now

    @property
    def available(self) -> bool:
        """True when at least one GPU is sampled."""
        return bool(self._devices)

    @staticmethod
    def _find_devices(nvml: ModuleType) -> list[_Device]:
        try:
            count = nvml.nvmlDeviceGetCount()
        except Exception:  # noqa: BLE001 - NVMLError, or a library older than these bindings
            return []
        opened = (_open(nvml, index) for index in range(count))
        return [device for device in opened if device is not None]

    def read(self) -> list[GpuSample]:
        """A sample of every GPU, now; [] without NVML or a GPU."""
        nvml = self._nvml
        if nvml is None:
            return []
        samples = []
        for device in self._devices:
            utilization = self._ask(device, "utilization",
                                    lambda handle: nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
            memory = self._ask(device, "memory", nvml.nvmlDeviceGetMemoryInfo)
            power_mw = self._ask(device, "power_usage", nvml.nvmlDeviceGetPowerUsage)
            limit_mw = self._ask(device, "power_limit", nvml.nvmlDeviceGetPowerManagementLimit)
            samples.append(GpuSample(
                uuid=device.uuid,
                utilization=None if utilization is None else utilization / 100.0,
                memory_total_bytes=None if memory is None else int(memory.total),
                memory_used_bytes=None if memory is None else int(memory.used),
                power_usage_watts=None if power_mw is None else power_mw / 1000.0,
                power_limit_watts=None if limit_mw is None else limit_mw / 1000.0,
                energy_joules=self._energy(device),
            ))
        return samples

    def _energy(self, device: _Device) -> float | None:
        """Joules since the first reading: the sum of the increases of NVML's millijoule count."""
        total_mj = self._ask(device, "energy", self._nvml.nvmlDeviceGetTotalEnergyConsumption)
        if total_mj is None:  # a passing failure keeps the count; one given up on drops it
            given_up = device.failures.get("energy", 0) >= GIVE_UP_AFTER
            return None if device.last_energy_mj is None or given_up else device.energy_j
        if device.last_energy_mj is not None and total_mj > device.last_energy_mj:
            device.energy_j += (total_mj - device.last_energy_mj) / 1000.0
        device.last_energy_mj = total_mj
        return device.energy_j

    def _ask(self, device: _Device, reading: str, call: Callable[[Any], Any]) -> Any:
        """call(handle), or None when it fails or has failed GIVE_UP_AFTER times in a row."""
        if device.failures.get(reading, 0) >= GIVE_UP_AFTER:
            return None
        nvml = self._nvml
        try:
            value = call(device.handle)
        except Exception as exc:  # noqa: BLE001 - a scrape must not fail because one reading did
            retry = isinstance(exc, nvml.NVMLError) and exc.value != nvml.NVML_ERROR_NOT_SUPPORTED
            device.failures[reading] = device.failures.get(reading, 0) + 1 if retry else GIVE_UP_AFTER
            return None
        device.failures[reading] = 0
        return value


def _open(nvml: ModuleType, index: int) -> _Device | None:
    """Device `index` with its UUID, or None when NVML cannot open it (lost, no permission)."""
    try:
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        uuid = nvml.nvmlDeviceGetUUID(handle)
    except Exception:  # noqa: BLE001 - that device is not sampled; the others are
        return None
    return _Device(handle, uuid.decode() if isinstance(uuid, bytes) else str(uuid))
