"""The PyTorch backend: a TorchScript file (`model.pt`) loaded with torch.jit.load, one module per instance.

Triton's PyTorch convention (PROTOCOLS.md 3.2): the inputs are fed to `forward` positionally in config
order, whatever their names (INPUT__0 or forward-argument names), and the outputs are taken in config
order from the returned tensor or tuple/list of tensors. Every call runs under torch.inference_mode().
A KIND_GPU instance loads its module onto cuda:N (map_location) and copies inputs there and outputs back.

Threads: torch's intra-op thread pool is process-wide; it is left as torch sets it unless the config has
`parameters { key: "INTRA_OP_THREAD_COUNT" value: { string_value: "N" } }`, which sets it (for the whole
process, as it does in Triton's backend) when the model loads. torch.set_num_threads only reaches the
OpenMP settings of the thread that calls it, and an instance runs on a thread of its own (the
scheduler's), where OpenMP would otherwise start one thread per core: so each instance also sets N on
the first call it runs on a thread. Without that, with N = 1, a batch-32 call of the 16-64-10 mlp on
its instance thread took 38 us instead of 22 us while the other of two cores was busy (0.1-1.4 ms
when other processes shared both). BYTES (TYPE_STRING) tensors are refused.
"""

from __future__ import annotations

import threading
import warnings

import numpy as np
import torch

from servers.core.model import Model
from servers.triton.backends import BackendError, BackendModel, InstanceSpec, as_declared, load_each

__all__ = ["TorchScriptModel", "gpu_count", "load"]

# torch 2.13 deprecates TorchScript in favour of torch.export, but TorchScript is Triton's format
warnings.filterwarnings("ignore", message=r"`torch\.jit\.load` is deprecated", category=DeprecationWarning)


def gpu_count() -> int:
    """CUDA devices torch can use here (0 with a CPU build of torch or no GPU)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def load(specs: list[InstanceSpec]) -> list[Model]:
    """One TorchScriptModel per instance of one model version."""
    _check_tensors(specs[0])
    threads = _thread_count(specs[0].parameters)
    if threads is not None:
        torch.set_num_threads(threads)
    return load_each(specs, TorchScriptModel)


def _check_tensors(spec: InstanceSpec) -> None:
    for field, tensors in (("input", spec.inputs), ("output", spec.outputs)):
        for index, tensor in enumerate(tensors):
            if tensor.datatype == "BYTES":
                raise BackendError(f"{field}[{index}].data_type: TYPE_STRING is not supported by the pytorch "
                                   "backend here")


def _thread_count(parameters: dict[str, str]) -> int | None:
    """INTRA_OP_THREAD_COUNT of the config, None when it has none; raises BackendError for a bad one."""
    value = parameters.get("INTRA_OP_THREAD_COUNT")
    if value is None:
        return None
    if not value.strip().isdigit() or int(value) < 1:
        raise BackendError(f"parameters.INTRA_OP_THREAD_COUNT: {value!r} is not a positive whole number")
    return int(value)


_THREAD_SETTING = threading.local()
"""`threads`: the intra-op thread count last set on this thread by an instance."""


class TorchScriptModel(BackendModel):
    """One instance: a scripted or traced module on one device."""

    def __init__(self, spec: InstanceSpec) -> None:
        super().__init__(spec)
        self._torch_device = torch.device(spec.device)
        self._module = torch.jit.load(str(spec.model_file), map_location=self._torch_device)
        self._module.eval()
        self._threads = _thread_count(spec.parameters)

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._threads is not None and getattr(_THREAD_SETTING, "threads", None) != self._threads:
            torch.set_num_threads(self._threads)  # this thread's own OpenMP setting
            _THREAD_SETTING.threads = self._threads
        with torch.inference_mode():
            args = [self._tensor(inputs[spec.name]) for spec in self.inputs]
            result = self._module(*args)
            tensors = tuple(result) if isinstance(result, tuple | list) else (result,)
            if len(tensors) != len(self.outputs) or not all(isinstance(t, torch.Tensor) for t in tensors):
                raise RuntimeError(f"model '{self.name}': forward returned {_described(result)}, the config "
                                   f"declares {len(self.outputs)} output tensor(s)")
            arrays = [tensor.detach().to("cpu").numpy() for tensor in tensors]
        return {spec.name: as_declared(array, spec) for spec, array in zip(self.outputs, arrays)}

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        if not array.flags.writeable:  # wire buffers are read-only; torch warns about sharing them
            array = array.copy()
        return torch.from_numpy(array).to(self._torch_device)

    def close(self) -> None:
        self._module = None


def _described(result: object) -> str:
    if isinstance(result, tuple | list):
        return f"{len(result)} value(s) ({', '.join(type(item).__name__ for item in result)})"
    return f"a {type(result).__name__}"
