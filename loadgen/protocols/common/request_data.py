"""The KServe requests a run sends: synthetic tensors from the model's metadata, or the entries of a
perf_analyzer --input-data JSON file, with the expected outputs when the file gives them.

perf_analyzer's format (the one Triton users already have):

    {"data": [{"INPUT0": [0.1, 0.2, ...]},                              # flat values
              {"INPUT0": {"content": [...], "shape": [1, 16]}},           # values and shape
              {"INPUT0": {"b64": "<base64 of the raw bytes>", "shape": [16]}}],
     "validation_data": [{"OUTPUT0": {"content": [...], "shape": [1, 10]}}, ...]}

Requests cycle through the entries in order. A flat entry takes the model's declared shape, with a
leading batch dimension of 1 for batching models and other dynamic dimensions from `shapes` (or
from the value count when only one is dynamic). With a batch size N > 1 (perf_analyzer's -b), each
request of a batching model carries its entry N times along the batch dimension, and the expected
outputs are repeated likewise. With validation data, each response is compared
with its entry's expected outputs (np.allclose, rtol 1e-5, atol 1e-6); a mismatch is an
`invalid_response` error of the run, which goes on.
"""

from __future__ import annotations

import base64
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from loadgen.errors import ProtocolMismatch
from loadgen.lowlevel.dtypes import NUMPY_DTYPES
from loadgen.protocols.common.payloads import has_batch_dim, synthetic_inputs

__all__ = ["AnswerJudge", "RequestData", "agree", "check_answer", "check_outputs", "count_entries", "from_raw",
           "read_labels", "read_references", "request_data", "score", "to_raw"]

OutputSpecs = dict[str, tuple[str, list[int]]]
"""Per output name: the datatype and the shape an answer must have (-1: any size)."""


@dataclass
class RequestData:
    """Each request's input tensors (KServe v2 JSON form, `data` flat) and, per request, expected outputs."""

    tensors: list[list[dict[str, Any]]]
    expected: list[dict[str, np.ndarray]] | None = None
    sources: list[str] = field(default_factory=list)
    specs: list[OutputSpecs] | None = None
    """With response checks on: per request, the outputs the model's metadata promises."""

    def checks(self) -> list[tuple[dict[str, np.ndarray] | None, OutputSpecs | None]] | None:
        """Per request, what its answer is checked against (check_answer's last two arguments); None
        when answers are not checked."""
        if self.expected is None and self.specs is None:
            return None
        return [(self.expected[i] if self.expected else None, self.specs[i] if self.specs else None)
                for i in range(len(self.tensors))]

    def judge(self, metadata: dict[str, Any], labels: str | None,
              references: str | None = None) -> AnswerJudge | None:
        """The AnswerJudge of these requests: their checks, and with a `labels` file (one label per
        entry, in order) or a `references` file (one reference output per entry) the scoring of the
        model's first output; None when answers are neither checked nor scored."""
        checks = self.checks()
        if labels is None and references is None:
            return AnswerJudge(checks) if checks is not None else None
        outputs = metadata.get("outputs") or []
        if not outputs:
            raise ProtocolMismatch("labels: the model's metadata declares no output to score")
        path = labels or references
        values = read_labels(labels) if labels else None
        expected = read_references(references) if references else None
        count = len(values if values is not None else expected)
        if count != len(self.tensors):
            raise ProtocolMismatch(f"{'labels' if labels else 'reference_outputs'} {path}: {count} entries for "
                                   f"{len(self.tensors)} input-data entries")
        return AnswerJudge(checks, values, outputs[0]["name"], expected)

    def with_specs(self, metadata: dict[str, Any]) -> RequestData:
        """The same requests, each answer to be checked against the model's declared outputs: every
        output there, with its datatype and its shape (the batch dimension as the request's)."""
        outputs = metadata.get("outputs") or []
        if not outputs:
            raise ProtocolMismatch("check_response: the model's metadata declares no outputs to check")
        self.specs = []  # per request: its batch size sets the outputs' batch dimension
        for tensors in self.tensors:
            batch = next((t["shape"][0] for t, spec in zip(tensors, metadata["inputs"])
                          if has_batch_dim(spec["shape"]) and t["shape"]), None)
            self.specs.append({spec["name"]: (spec["datatype"], _pattern(spec["shape"], batch)) for spec in outputs})
        return self


Outputs = dict[str, tuple[str, list[int], np.ndarray]]
"""An answer's outputs as a client decoded them: name -> (datatype, shape, values)."""


@dataclass
class AnswerJudge:
    """What a client does with each answer it decodes: check it (validation data, declared outputs)
    and score it against the label of its request's entry (the predicted class is the argmax of
    `output` over its last dimension, one prediction per row)."""

    checks: list[tuple[dict[str, np.ndarray] | None, OutputSpecs | None]] | None = None
    labels: list[int] | None = None
    output: str = ""
    references: list[np.ndarray] | None = None
    """Per entry, a reference answer's output values (another model's, say): each answer is scored by
    its agreement with it (same argmax, and cosine similarity) instead of against a label."""

    def judge(self, outputs: Outputs | str, index: int) -> tuple[str | None, int, int, int]:
        """(what is wrong with the answer or None, rows scored, rows right, summed cosine similarity in
        millionths) for request `index`; `outputs` is the problem text when the answer could not be
        decoded."""
        if isinstance(outputs, str):
            return outputs, 0, 0, 0
        if self.checks is not None:
            problem = check_answer(outputs, *self.checks[index])
            if problem is not None:
                return problem, 0, 0, 0
        if self.labels is None and self.references is None:
            return None, 0, 0, 0
        if self.output not in outputs:
            return f"output {self.output} missing (it is the output scored)", 0, 0, 0
        values = outputs[self.output][2]
        if self.references is not None:
            return None, *agree(values, self.references[index])
        return None, *score(values, self.labels[index]), 0


def score(values: np.ndarray, label: int) -> tuple[int, int]:
    """(rows, rows whose argmax is `label`) of a classifier's output: one row per leading index, the
    classes along the rest (a 1-D output is one row).

    >>> score(np.array([[0.1, 0.9], [0.8, 0.2]]), 1)
    (2, 1)
    """
    predicted = _rows(values).argmax(axis=1)
    return int(predicted.size), int(np.count_nonzero(predicted == label))


def agree(values: np.ndarray, reference: np.ndarray) -> tuple[int, int, int]:
    """(rows, rows whose argmax is the reference's, summed cosine similarity with the reference in
    millionths) of an output whose rows should each equal `reference`.

    >>> agree(np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([1.0, 0.0]))
    (2, 1, 1000000)
    """
    rows = _rows(values)
    want = np.asarray(reference, dtype=np.float64).reshape(-1)
    if rows.shape[1] != want.size:
        return int(rows.shape[0]), 0, 0
    norms = np.linalg.norm(rows, axis=1) * np.linalg.norm(want)
    cosine = np.divide(rows @ want, norms, out=np.zeros(rows.shape[0]), where=norms > 0)
    same = np.count_nonzero(rows.argmax(axis=1) == want.argmax())
    return int(rows.shape[0]), int(same), int(np.rint(cosine * 1e6).sum())


def _rows(values: np.ndarray) -> np.ndarray:
    """An output as [rows, values]: one row per leading index (a 1-D output is one row)."""
    rows = np.asarray(values, dtype=np.float64)
    return rows.reshape(1, -1) if rows.ndim <= 1 else rows.reshape(rows.shape[0], -1)


def read_references(path: str) -> list[np.ndarray]:
    """Per input-data entry, the reference output values: a JSON list of lists of numbers, or
    {"data": [...]} of them, or perf_analyzer's {"validation_data": [{OUTPUT: values}, ...]} (its first
    output)."""
    try:
        document = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from None
    if isinstance(document, dict):
        document = document.get("data", document.get("validation_data"))
    entries = []
    for entry in document if isinstance(document, list) else []:
        if isinstance(entry, dict) and entry:
            entry = next(iter(entry.values()))
            entry = entry.get("content", entry) if isinstance(entry, dict) else entry
        try:
            entries.append(np.array(list(_flatten(entry)), dtype=np.float64))
        except (TypeError, ValueError):
            entries = []
            break
    if not entries:
        raise ValueError(f"{path}: expected a JSON list with each entry's reference output values")
    return entries


def read_labels(path: str) -> list[int]:
    """The class labels of a labels file: a JSON list of integers, one per input-data entry."""
    try:
        labels = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from None
    if not isinstance(labels, list) or not labels or not all(type(label) is int for label in labels):
        raise ValueError(f"{path}: expected a JSON list of integer class labels, e.g. [3, 0, 7]")
    return labels


def count_entries(input_data: str) -> int:
    """How many "data" entries a perf_analyzer input-data file has (0 when it cannot be read)."""
    try:
        entries = json.loads(Path(input_data).read_text(encoding="utf-8")).get("data")
    except (OSError, ValueError, AttributeError):
        return 0
    return len(entries) if isinstance(entries, list) else 0


def request_data(metadata: dict[str, Any], seed: int, shapes: dict[str, list[int]],
                 input_data: str | None, batch_size: int = 1) -> RequestData:
    """The requests for a model with `metadata`; raises ProtocolMismatch naming a bad entry, or a
    batch size the model cannot take."""
    if batch_size > 1 and not any(has_batch_dim(spec["shape"]) for spec in metadata["inputs"]):
        raise ProtocolMismatch(f"batch_size {batch_size}: model {metadata.get('name', '')!r} has no batch "
                               "dimension (its inputs declare no leading -1: max_batch_size 0)")
    if input_data is None:
        return RequestData([synthetic_inputs(metadata["inputs"], seed, shapes or None, batch_size)])
    try:
        document = json.loads(Path(input_data).read_text())
    except (OSError, ValueError) as exc:
        raise ProtocolMismatch(f"input_data {input_data}: {exc}") from None
    entries = document.get("data") if isinstance(document, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ProtocolMismatch(f'input_data {input_data}: expected {{"data": [{{"INPUT": ...}}, ...]}}')
    specs = {spec["name"]: spec for spec in metadata["inputs"]}
    tensors = []
    for index, entry in enumerate(entries):
        where = f"input_data {input_data}: data[{index}]"
        if not isinstance(entry, dict) or set(entry) != set(specs):
            raise ProtocolMismatch(f"{where}: needs exactly the model's inputs {sorted(specs)}")
        tensors.append([_batched(_tensor(name, entry[name], specs[name], shapes, where), specs[name], batch_size)
                        for name in specs])
    expected = None
    validation = document.get("validation_data")
    if validation is not None:
        if not isinstance(validation, list) or len(validation) != len(entries):
            raise ProtocolMismatch(f"input_data {input_data}: validation_data needs one entry per data entry")
        outputs = {spec["name"]: spec for spec in metadata.get("outputs", [])}
        expected = [{name: _expected(name, value, outputs.get(name), f"{input_data}: validation_data[{i}]",
                               batch_size)
                     for name, value in entry.items()} for i, entry in enumerate(validation)]
    return RequestData(tensors, expected)


def _tensor(name: str, value: Any, spec: dict[str, Any], shapes: dict[str, list[int]], where: str) -> dict:
    datatype = spec["datatype"]
    if isinstance(value, dict) and "b64" in value:
        raw = base64.b64decode(value["b64"])
        if datatype == "BYTES":
            data: list[Any] = [raw]
        else:
            data = np.frombuffer(raw, dtype=NUMPY_DTYPES[datatype]).tolist()
        shape = value.get("shape")
    elif isinstance(value, dict):
        data, shape = value.get("content"), value.get("shape")
    else:
        data, shape = value, None
    if not isinstance(data, list):
        raise ProtocolMismatch(f"{where}: {name} needs a list of values (or content / b64)")
    data = list(_flatten(data))
    shape = list(shape) if shape is not None else _shape_for(spec["shape"], len(data), shapes.get(name), where, name)
    if math.prod(shape) != len(data):
        raise ProtocolMismatch(f"{where}: {name} has {len(data)} values for shape {shape}")
    return {"name": name, "shape": shape, "datatype": datatype, "data": data}


def _batched(tensor: dict[str, Any], spec: dict[str, Any], batch_size: int) -> dict[str, Any]:
    """The entry `batch_size` times along the batch dimension (unchanged for inputs without one)."""
    if batch_size == 1 or not has_batch_dim(spec["shape"]) or not tensor["shape"]:
        return tensor
    return {**tensor, "shape": [tensor["shape"][0] * batch_size, *tensor["shape"][1:]],
            "data": tensor["data"] * batch_size}


def _shape_for(declared: list[int], count: int, override: list[int] | None, where: str, name: str) -> list[int]:
    if override is not None:
        return list(override)
    shape = list(declared)
    if shape and shape[0] == -1 and len(shape) > 1:
        shape[0] = 1  # the batch dimension of a batching model
    dynamic = [i for i, dim in enumerate(shape) if dim < 0]
    if len(dynamic) > 1:
        raise ProtocolMismatch(f"{where}: {name} has dynamic shape {declared}: give its shape (shapes or 'shape')")
    if dynamic:
        known = math.prod(dim for dim in shape if dim >= 0)
        shape[dynamic[0]] = count // known if known else count
    return shape


def _flatten(values: list[Any]) -> Any:
    for value in values:
        if isinstance(value, list):
            yield from _flatten(value)
        else:
            yield value


def _expected(name: str, value: Any, spec: dict[str, Any] | None, where: str, batch_size: int = 1) -> np.ndarray:
    if isinstance(value, dict):
        content, shape = value.get("content"), value.get("shape")
    else:
        content, shape = value, None
    if not isinstance(content, list):
        raise ProtocolMismatch(f"{where}: {name} needs a list of values")
    dtype = object if spec is not None and spec["datatype"] == "BYTES" else np.float64
    array = np.array(list(_flatten(content)), dtype=dtype)
    if batch_size > 1:  # the entry's rows repeated, as the request repeats its inputs
        return np.tile(array, batch_size)
    return array.reshape(shape) if shape is not None else array


def _pattern(declared: list[int], batch: int | None) -> list[int]:
    shape = [int(dim) for dim in declared]
    if batch is not None and has_batch_dim(shape):
        shape[0] = batch
    return shape


def check_answer(got: dict[str, tuple[str, list[int], np.ndarray]], expected: dict[str, np.ndarray] | None,
                 specs: OutputSpecs | None) -> str | None:
    """None when an answer's outputs (name -> datatype, shape, values) have the promised names,
    datatypes and shapes (`specs`) and the expected values (`expected`), else what differs."""
    for name, (datatype, pattern) in (specs or {}).items():
        if name not in got:
            return f"output {name} missing"
        have_type, have_shape, _ = got[name]
        if have_type != datatype:
            return f"output {name}: datatype {have_type}, the model declares {datatype}"
        if len(have_shape) != len(pattern) or any(want not in (-1, have) for have, want in zip(have_shape, pattern)):
            return f"output {name}: shape {list(have_shape)}, expected {pattern}"
    if expected is None:
        return None
    return check_outputs({name: values for name, (_, _, values) in got.items()}, expected)


def check_outputs(got: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> str | None:
    """None when every expected output is there with the expected values, else what differs."""
    for name, want in expected.items():
        have = got.get(name)
        if have is None:
            return f"output {name} missing"
        if want.dtype == object:
            same = [bytes(x) if isinstance(x, bytes) else str(x).encode() for x in np.ravel(have)] == \
                   [x if isinstance(x, bytes) else str(x).encode() for x in want.ravel()]
        else:
            same = have.size == want.size and np.allclose(np.ravel(have).astype(np.float64), want.ravel(),
                                                          rtol=1e-5, atol=1e-6)
        if not same:
            return f"output {name} differs from the expected values"
    return None


def to_raw(datatype: str, data: list[Any]) -> bytes:
    """A tensor's flat values as the binary form (gRPC raw contents, HTTP binary extension): little-endian
    elements, or for BYTES each element as a 4-byte little-endian length and its bytes."""
    if datatype == "BYTES":
        parts = []
        for item in data:
            raw = item if isinstance(item, bytes) else str(item).encode()
            parts += [len(raw).to_bytes(4, "little"), raw]
        return b"".join(parts)
    if datatype == "BF16":  # the upper half of each float32, as Triton stores bfloat16
        return (np.asarray(data, dtype="<f4").view("<u4") >> 16).astype("<u2").tobytes()
    return np.asarray(data, dtype=NUMPY_DTYPES[datatype]).tobytes()


def from_raw(datatype: str, shape: list[int], raw: bytes) -> np.ndarray:
    """The inverse of `to_raw`: BYTES come back as a flat object array, the others in `shape`."""
    if datatype == "BF16":
        return (np.frombuffer(raw, dtype="<u2").astype("<u4") << 16).view("<f4").reshape(shape)
    if datatype != "BYTES":
        return np.frombuffer(raw, dtype=NUMPY_DTYPES[datatype]).reshape(shape)
    items, offset = [], 0
    while offset + 4 <= len(raw):
        length = int.from_bytes(raw[offset:offset + 4], "little")
        items.append(raw[offset + 4:offset + 4 + length])
        offset += 4 + length
    return np.array(items, dtype=object)
