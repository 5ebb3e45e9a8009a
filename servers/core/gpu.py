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

The GPUs sampled are those a CUDA process here may use, as Triton exports only its own: every GPU NVML
lists, or with CUDA_VISIBLE_DEVICES set, those it names (`visible_devices`, read as CUDA reads it; ""
means none). NVML sees all GPUs whatever the variable says. An index in it is taken in NVML's order,
which is PCI bus order: CUDA's order with CUDA_DEVICE_ORDER=PCI_BUS_ID, and under CUDA's default
(fastest first) too when the GPUs are alike. Triton maps CUDA devices to DCGM ones by PCI bus id
through the CUDA runtime, which a server without CUDA does not have; a GPU-UUID entry is exact either way.
Each GPU is labelled by its UUID, as Triton labels it.
"""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, NamedTuple

__all__ = ["GIVE_UP_AFTER", "GpuSample", "GpuSampler", "visible_devices"]

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
        """Start NVML and pick the GPUs to sample (CUDA_VISIBLE_DEVICES is read now)."""
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
        listed = self._find_devices(self._nvml)
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        chosen = visible_devices([device.uuid if device else "" for device in listed], visible)
        self._devices = [listed[index] for index in chosen if listed[index] is not None]
        if not listed:
            self.unavailable_reason = "NVML lists no GPU"
        elif not self._devices:
            self.unavailable_reason = (f"CUDA_VISIBLE_DEVICES={visible!r} leaves none of the {len(listed)} "
                                       "GPU(s) NVML lists (or NVML cannot open them)")
        for device in self._devices:
            self._energy(device)  # the baseline: energy counts from now

    @property
    def available(self) -> bool:
        """True when at least one GPU is sampled."""
        return bool(self._devices)

    @staticmethod
    def _find_devices(nvml: ModuleType) -> list[_Device | None]:
        """Every GPU NVML lists, by index; None for one it cannot open."""
        try:
            count = nvml.nvmlDeviceGetCount()
        except Exception:  # noqa: BLE001 - NVMLError, or a library older than these bindings
            return []
        return [_open(nvml, index) for index in range(count)]

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


_INDEX = re.compile(r"[0-9]+")
_MIG_OF_GPU = re.compile(r"MIG-(GPU-[^/]+)/.*")


def visible_devices(uuids: Sequence[str], cuda_visible_devices: str | None) -> list[int]:
    """The GPUs CUDA_VISIBLE_DEVICES leaves to a CUDA process: indices into `uuids` (each GPU's
    "GPU-..." UUID in NVML's order, "" where unknown), in the order the variable names them.

    None (unset): every GPU. "" (set and empty): none. Otherwise comma-separated entries, read as CUDA
    reads them: a whole number is an index; "GPU-<uuid>", or a prefix of one that fits only one GPU,
    names that GPU; the first entry that names no GPU (an index out of range, "-1", an unknown or
    ambiguous UUID) ends the list, and CUDA ignores it and every entry after it. A GPU named twice
    counts once. A MIG device's entry in the "MIG-GPU-<uuid>/<gi>/<ci>" form stands for its GPU; one
    in the "MIG-<uuid>" form names no GPU NVML lists here and is passed over.

    Example:
        visible_devices(["GPU-aa", "GPU-bb", "GPU-cc"], "2,GPU-a")  # -> [2, 0]
    """
    if cuda_visible_devices is None:
        return list(range(len(uuids)))
    chosen: list[int] = []
    for entry in (part.strip() for part in cuda_visible_devices.split(",")):
        if not entry:
            break
        index = _device_named(uuids, entry)
        if index is None:
            break
        if index >= 0 and index not in chosen:
            chosen.append(index)
    return chosen


def _device_named(uuids: Sequence[str], entry: str) -> int | None:
    """The index `entry` names, -1 for a MIG device it cannot place, None when it names none."""
    if _INDEX.fullmatch(entry):
        index = int(entry)
        return index if index < len(uuids) else None
    mig = _MIG_OF_GPU.fullmatch(entry)
    if mig is not None:
        entry = mig.group(1)
    elif entry.startswith("MIG-"):
        return -1
    if not entry.startswith("GPU-"):
        return None
    matches = [index for index, uuid in enumerate(uuids) if uuid and uuid.startswith(entry)]
    return matches[0] if len(matches) == 1 else None
