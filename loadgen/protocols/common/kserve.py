"""The `[target]` keys and flags kserve-http and kserve-grpc share: request data and answer checks."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

from pydantic import Field, field_validator, model_validator

from loadgen.flags import Flag, as_path_text, if_set
from loadgen.protocols.base import TargetOptions, existing_file
from loadgen.protocols.common.request_data import Outputs, count_entries, read_labels, read_references

__all__ = ["FLAGS", "KServeOptions", "TensorClient", "parse_shapes"]


class KServeOptions(TargetOptions):
    """The tensor side of a KServe v2 target."""

    shapes: dict[str, list[int]] = Field(default_factory=dict)
    """Concrete shapes of inputs with dynamic dimensions, e.g. {INPUT0 = [1, 224]}."""
    input_data: str | None = None
    """A perf_analyzer --input-data JSON file: requests cycle through its "data" entries, and when it
    has "validation_data" every response is checked (a mismatch is an invalid_response error)."""
    batch_size: int = Field(default=1, ge=1)
    """Rows per request for a batching model (perf_analyzer's -b): synthetic tensors get this leading
    dimension, input_data entries are repeated this many times."""
    labels: str | None = None
    """A JSON list of integer class labels, one per input_data entry in order: every answer's predicted
    class (the argmax of the model's first output, per row) is scored against its entry's label, and
    summary.json gets the accuracy."""
    reference_outputs: str | None = None
    """Instead of labels: per input_data entry, a reference answer's output values (JSON list of lists,
    e.g. the fp32 model's embeddings): each answer is scored by its agreement with it (same argmax, and
    cosine similarity: summary.json's accuracy.top1 and accuracy.mean_cosine)."""
    check_response: bool = False
    """Check every answer against the model's metadata: each declared output present, with its
    datatype and shape (a wrong one is an invalid_response error; the run goes on)."""

    @property
    def inferences_per_request(self) -> int:
        return self.batch_size

    @field_validator("input_data")
    @classmethod
    def _input_data_exists(cls, value: str | None) -> str | None:
        return existing_file(value)

    @model_validator(mode="after")
    def _scores_fit_input_data(self) -> KServeOptions:
        if self.labels is not None and self.reference_outputs is not None:
            raise ValueError("give labels or reference_outputs (what answers are scored against), not both")
        for key, path, read in (("labels", self.labels, read_labels),
                                ("reference_outputs", self.reference_outputs, read_references)):
            if path is None:
                continue
            if self.input_data is None:
                raise ValueError(f"{key} needs input_data (--input-data): one entry each")
            count, entries = len(read(existing_file(path) or "")), count_entries(self.input_data)
            if count != entries:
                raise ValueError(f"{key} {path} has {count} entries for the {entries} entries of input_data "
                                 f"{self.input_data}")
        return self


@runtime_checkable
class TensorClient(Protocol):
    """A KServe client, which can also hand back each request's decoded answer (compare --reference)."""

    def answers(self) -> list[Outputs | str]: ...


def parse_shapes(items: list[str]) -> dict[str, list[int]] | None:
    """["INPUT0:1,224"] -> {"INPUT0": [1, 224]}; a bad item raises ValueError naming it."""
    shapes = {}
    for item in items:
        name, sep, dims = item.rpartition(":")
        try:
            shapes[name] = [int(dim) for dim in dims.split(",")]
        except ValueError:
            sep = ""
        if not sep or not name:
            raise ValueError(f"{item!r}: expected NAME:DIM,DIM,...")
    return shapes or None


FLAGS = (
    Flag("shape", list[str] | None, "Shape of an input with dynamic dims, NAME:1,224 ; repeatable.",
         key=("target", "shapes"), to_scenario=parse_shapes),
    Flag("input_data", Path | None,
         "perf_analyzer --input-data JSON (requests cycle; validation_data checks answers).",
         key=("target", "input_data"), to_scenario=as_path_text),
    Flag("batch_size", int | None, "Rows per request for a batching model (as perf_analyzer's -b).",
         key=("target", "batch_size"), decls=("--batch-size", "-b")),
    Flag("labels", Path | None, "JSON list of integer class labels, one per --input-data entry: every answer "
         "is scored (top-1) and summary.json gets the accuracy.", key=("target", "labels"), to_scenario=as_path_text),
    Flag("reference_outputs", Path | None, "Instead of --labels: JSON list of each --input-data entry's reference "
         "output values; answers are scored by agreement (argmax, cosine).", key=("target", "reference_outputs"),
         to_scenario=as_path_text),
    Flag("check_response", bool, "Check each answer's output names, datatypes and shapes against the "
         "model's metadata (a wrong one is an invalid_response error).",
         key=("target", "check_response"), to_scenario=if_set, default=False, decls=("--check-response",)),
)
