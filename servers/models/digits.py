"""The digits models of make-repo: a small CNN trained on scikit-learn's 8x8 handwritten digits, and
variants of it that trade accuracy for speed or size, for accuracy-vs-speed comparisons.

Data: sklearn.datasets.load_digits() (1797 images of 8x8 pixels with values 0-16, shipped inside
scikit-learn: nothing is downloaded), split once into 1437 training and 360 test images (stratified,
random_state 0, whatever the seed). Every model takes the raw pixels, FP32 INPUT0 [64] (batch up to 32,
dynamic batching as the other torch models), scales them itself (/16) and answers the logits, FP32
OUTPUT0 [10]:

    digits_cnn              TorchScript FP32: conv 3x3 (16) + relu, conv 3x3 (32) + relu, maxpool 2,
                            linear 512 -> 64 + relu, linear 64 -> 10; Adam, 30 epochs
    digits_cnn_fp16         the same weights in half precision (cast inside: FP32 in and out)
    digits_cnn_bf16         the same weights in bfloat16
    digits_cnn_int8         torch dynamic quantization of the Linear layers (int8 weights; KIND_CPU)
    digits_cnn_int8_static  torch FX post-training static quantization (x86 backend: every conv and
                            linear in int8, activations calibrated on the training images; KIND_CPU)
    digits_cnn_onnx         the FP32 CNN exported with torch.onnx.export (TorchScript-based exporter)
    digits_cnn_onnx_int8    onnxruntime.quantization.quantize_dynamic of that file (ConvInteger,
                            MatMulInteger; KIND_CPU)
    digits_cnn_pruned50     global L1 unstructured pruning of the conv and linear weights to 50 %
    digits_cnn_pruned90     ... and to 90 % zeros, each fine-tuned 5 epochs with its mask, the zeros then
                            baked in (dense kernels: the same size and speed, the accuracy of fewer weights)
    digits_student          an MLP 64 -> 32 -> 10 distilled from the CNN's soft labels (temperature 4,
                            0.7 KL + 0.3 cross-entropy with the labels)

Training is deterministic: fixed seeds, torch.use_deterministic_algorithms and one intra-op thread while
training (the result does not depend on the core count), so the same seed writes the same bytes. Beside
the models, `_data/` holds the test split for clients (digits_test.json in perf_analyzer's --input-data
form, digits_test_labels.json) and each model's test accuracy measured here (digits_accuracy.json).
"""

from __future__ import annotations

import contextlib
import copy
import json
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
import torch.nn.functional as F
from onnxruntime.quantization import QuantType, quantize_dynamic
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from servers.models.make_repo import (
    BATCHING,
    DATA_FOLDER,
    DIGITS_NAMES,
    TORCH_BATCH,
    config_text,
    model_folder,
    quiet_root_logger,
)

__all__ = ["DigitsCNN", "DigitsMLP", "DigitsSplit", "digits_split", "write_digits"]

TEST_FRACTION = 0.2
SPLIT_SEED = 0

_IO = ((("INPUT0", "TYPE_FP32", (64,)),), (("OUTPUT0", "TYPE_FP32", (10,)),))
_TORCHSCRIPT = 'platform: "pytorch_libtorch"'
_ONNX = 'platform: "onnxruntime_onnx"'
_TORCH_CPU = "torch's quantized kernels run on the CPU only"
_ORT_CPU = "ONNX Runtime's integer kernels (ConvInteger, DynamicQuantizeLinear) run on the CPU"
_BATCH = 32
_EPOCHS = 30
_FINE_TUNE_EPOCHS = 5
_STUDENT_EPOCHS = 60
_TEMPERATURE = 4.0
_SOFT_WEIGHT = 0.7


@dataclass(frozen=True)
class DigitsSplit:
    """The fixed train/test split: pixels as FP32 [n, 64] with values 0-16, labels as int64 [n]."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def digits_split() -> DigitsSplit:
    """scikit-learn's digits, split 80/20, stratified, random_state 0 (the same split for every seed).

    >>> split = digits_split()
    >>> split.x_train.shape, split.x_test.shape, float(split.x_test.max())
    ((1437, 64), (360, 64), 16.0)
    """
    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.data.astype(np.float32), digits.target.astype(np.int64), test_size=TEST_FRACTION,
        stratify=digits.target, random_state=SPLIT_SEED)
    return DigitsSplit(x_train, y_train, x_test, y_test)


class DigitsCNN(nn.Module):
    """Raw pixels (any shape of n * 64 values, 0-16) -> logits [n, 10]."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(-1, 1, 8, 8) / 16.0
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))


class DigitsMLP(nn.Module):
    """The student: raw pixels -> linear 64 -> 32 + relu -> linear 32 -> 10."""

    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, hidden)
        self.fc2 = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x.reshape(-1, 64) / 16.0)))


class HalfPrecision(nn.Module):
    """A network in FP16, FP32 in and out."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net.half()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.half()).float()


class BFloat16(nn.Module):
    """A network in bfloat16, FP32 in and out."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net.bfloat16()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.to(torch.bfloat16)).float()


@dataclass
class _Variant:
    name: str
    module: Any
    """The torch module to script."""
    kind: str = ""
    why: str = ""


def write_digits(dest: Path, seed: int = 0, log: Callable[[str], None] | None = None) -> list[str]:
    """Train the digits models, write each as a model folder of `dest` and the test data to
    `dest/_data`; returns the model names.

    Example:
        write_digits(Path("models"))   # then: python -m servers.triton --model-repository models
    """
    started = time.perf_counter()
    split = digits_split()
    with _deterministic_training():
        cnn = _train_cnn(split, seed)
        pruned = {amount: _pruned(cnn, split, seed, amount) for amount in (50, 90)}
        student = _distilled(cnn, split, seed)
    trained = time.perf_counter() - started
    accuracy: dict[str, float] = {}
    x_test = torch.from_numpy(split.x_test)
    with warnings.catch_warnings():  # torch.jit and torch.ao.quantization are deprecated, still shipped
        warnings.simplefilter("ignore")
        variants = [
            _Variant("digits_cnn", cnn),
            _Variant("digits_cnn_fp16", HalfPrecision(copy.deepcopy(cnn))),
            _Variant("digits_cnn_bf16", BFloat16(copy.deepcopy(cnn))),
            _Variant("digits_cnn_int8", torch.ao.quantization.quantize_dynamic(
                copy.deepcopy(cnn), {nn.Linear}, dtype=torch.qint8), "KIND_CPU", _TORCH_CPU),
            _Variant("digits_cnn_int8_static", _static_int8(cnn, split), "KIND_CPU", _TORCH_CPU),
            _Variant("digits_cnn_pruned50", pruned[50]),
            _Variant("digits_cnn_pruned90", pruned[90]),
            _Variant("digits_student", student),
        ]
        for variant in variants:
            version = model_folder(dest, variant.name, config_text(
                variant.name, _TORCHSCRIPT, TORCH_BATCH, *_IO, batching=BATCHING, kind=variant.kind,
                why=variant.why))
            scripted = torch.jit.script(variant.module)
            torch.jit.save(scripted, str(version / "model.pt"))
            with torch.inference_mode():
                accuracy[variant.name] = _accuracy(scripted(x_test).numpy(), split.y_test)
        onnx_file = _write_onnx(dest, cnn)
        int8_file = _write_onnx_int8(dest, onnx_file)
        for name, path in (("digits_cnn_onnx", onnx_file), ("digits_cnn_onnx_int8", int8_file)):
            accuracy[name] = _accuracy(_onnx_run(path, split.x_test), split.y_test)
    accuracy = {name: round(accuracy[name], 4) for name in DIGITS_NAMES}
    _write_data(dest / DATA_FOLDER, split, accuracy)
    if log is not None:
        log(f"digits: trained in {trained:.1f} s, wrote in {time.perf_counter() - started - trained:.1f} s; "
            f"test accuracy of {len(split.y_test)} images: "
            + ", ".join(f"{name} {value:.4f}" for name, value in accuracy.items()))
    return list(DIGITS_NAMES)


@contextlib.contextmanager
def _deterministic_training() -> Iterator[None]:
    """One intra-op thread and torch's deterministic algorithms, restored afterwards."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(deterministic)
        torch.set_num_threads(threads)


def _fit(net: nn.Module, x: torch.Tensor, loss_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
         epochs: int, lr: float, seed: int) -> nn.Module:
    """Adam on shuffled batches of 32; loss_of(logits, indices) is the loss of a batch."""
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    net.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), _BATCH):
            batch = order[start:start + _BATCH]
            loss = loss_of(net(x[batch]), batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return net.eval()


def _train_cnn(split: DigitsSplit, seed: int) -> DigitsCNN:
    torch.manual_seed(seed)
    x, y = torch.from_numpy(split.x_train), torch.from_numpy(split.y_train)
    return _fit(DigitsCNN(), x, lambda logits, batch: F.cross_entropy(logits, y[batch]), _EPOCHS, 1e-3, seed)


def _pruned(cnn: DigitsCNN, split: DigitsSplit, seed: int, percent: int) -> DigitsCNN:
    """`percent` % of the conv and linear weights (the smallest by magnitude, over all layers at once)
    set to zero, fine-tuned with the mask, then the mask removed with the zeros kept."""
    from torch.nn.utils import prune

    net = copy.deepcopy(cnn)
    weights = [(layer, "weight") for layer in (net.conv1, net.conv2, net.fc1, net.fc2)]
    prune.global_unstructured(weights, pruning_method=prune.L1Unstructured, amount=percent / 100)
    x, y = torch.from_numpy(split.x_train), torch.from_numpy(split.y_train)
    _fit(net, x, lambda logits, batch: F.cross_entropy(logits, y[batch]), _FINE_TUNE_EPOCHS, 5e-4,
         seed + percent)
    for layer, name in weights:
        prune.remove(layer, name)
    return net


def _distilled(teacher: DigitsCNN, split: DigitsSplit, seed: int) -> DigitsMLP:
    """The student fitted to the teacher's logits softened by the temperature, and to the labels."""
    x, y = torch.from_numpy(split.x_train), torch.from_numpy(split.y_train)
    with torch.no_grad():
        soft = F.softmax(teacher(x) / _TEMPERATURE, dim=1)

    def loss_of(logits: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        distill = F.kl_div(F.log_softmax(logits / _TEMPERATURE, dim=1), soft[batch], reduction="batchmean")
        hard = F.cross_entropy(logits, y[batch])
        return _SOFT_WEIGHT * _TEMPERATURE ** 2 * distill + (1 - _SOFT_WEIGHT) * hard

    torch.manual_seed(seed + 1)
    return _fit(DigitsMLP(), x, loss_of, _STUDENT_EPOCHS, 3e-3, seed + 1)


def _static_int8(cnn: DigitsCNN, split: DigitsSplit) -> nn.Module:
    """FX graph mode post-training quantization with the x86 backend's default qconfig, calibrated on
    every training image."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    x = torch.from_numpy(split.x_train)
    engine, torch.backends.quantized.engine = torch.backends.quantized.engine, "x86"
    try:
        prepared = prepare_fx(copy.deepcopy(cnn).eval(), get_default_qconfig_mapping("x86"),
                              example_inputs=(x[:1],))
        with torch.inference_mode():
            for start in range(0, len(x), 256):
                prepared(x[start:start + 256])
        quantized = convert_fx(prepared)
    finally:
        torch.backends.quantized.engine = engine
    for node in quantized.graph.nodes:  # FX writes torch.Tensor annotations as names TorchScript cannot read
        node.type = None
    quantized.recompile()
    return quantized


def _write_onnx(dest: Path, cnn: DigitsCNN) -> Path:
    version = model_folder(dest, "digits_cnn_onnx", config_text("digits_cnn_onnx", _ONNX, TORCH_BATCH, *_IO,
                                                               batching=BATCHING))
    path = version / "model.onnx"
    torch.onnx.export(cnn, (torch.zeros(2, 64),), str(path), dynamo=False, input_names=["INPUT0"],
                      output_names=["OUTPUT0"],
                      dynamic_axes={"INPUT0": {0: "batch"}, "OUTPUT0": {0: "batch"}})
    return path


def _write_onnx_int8(dest: Path, source: Path) -> Path:
    version = model_folder(dest, "digits_cnn_onnx_int8", config_text(
        "digits_cnn_onnx_int8", _ONNX, TORCH_BATCH, *_IO, batching=BATCHING, kind="KIND_CPU", why=_ORT_CPU))
    path = version / "model.onnx"
    with quiet_root_logger():  # quantize_dynamic logs a hint to pre-process the model on the root logger
        quantize_dynamic(source, path, weight_type=QuantType.QInt8)
    return path


def _onnx_run(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["OUTPUT0"], {"INPUT0": x})[0]


def _accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.argmax(logits, axis=1) == labels))


def _write_data(folder: Path, split: DigitsSplit, accuracy: dict[str, float]) -> None:
    """The test images as perf_analyzer --input-data (one flat entry per image: both perf_analyzer and
    loadgen give it the model's shape, [1, 64] for a request), their labels, and the accuracies."""
    folder.mkdir(parents=True, exist_ok=True)
    entries = [json.dumps({"INPUT0": [float(value) for value in row]}) for row in split.x_test]
    text = '{"data": [\n' + ",\n".join(entries) + "\n]}\n"
    (folder / "digits_test.json").write_text(text, encoding="utf-8")
    (folder / "digits_test_labels.json").write_text(json.dumps([int(label) for label in split.y_test]) + "\n",
                                                    encoding="utf-8")
    (folder / "digits_accuracy.json").write_text(json.dumps(accuracy, indent=2) + "\n", encoding="utf-8")
