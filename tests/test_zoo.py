"""Tests of the offline data snapshots (lessons_lib.data) and the teacher zoo (lessons_lib.zoo).

Seeded, offline and quick: the trained teachers are only loaded and evaluated; training is
exercised by 3-step smoke builds into a temporary folder, never into the repository's data/.
"""
from __future__ import annotations

import dataclasses
import gzip
import hashlib
import importlib.util
import json
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lessons_lib import data, evaluate, moe, teachers, zoo

REPO = Path(__file__).resolve().parents[1]
MANIFEST = json.loads((REPO / "data" / "manifest.json").read_text())


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def _repo_data(monkeypatch):
    """Every test starts from the repository's data/ unless it points elsewhere itself."""
    monkeypatch.delenv("LESSONS_DATA_DIR", raising=False)


def _copy_with_manifest(rels: list[str], dest: Path) -> Path:
    for rel in [*rels, "manifest.json"]:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(REPO / "data" / rel, dest / rel)
    return dest


def recorded_block_size(name: str) -> int:
    return MANIFEST["teachers"][name]["metrics"]["block_size"]


def _flip_byte(path: Path, offset: int = -100) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x01
    path.write_bytes(bytes(raw))


# ----------------------------------------------------------------------------- data
def test_data_dir_follows_env(monkeypatch, tmp_path):
    assert data.data_dir() == REPO / "data"
    monkeypatch.setenv("LESSONS_DATA_DIR", str(tmp_path))
    assert data.data_dir() == tmp_path


@pytest.mark.parametrize("loader, size, sizes", [
    (data.load_mnist, 28, {"train": 3500, "val": 500, "test": 1000}),
    (data.load_digits8x8, 8, {"train": 1259, "val": 179, "test": 359}),
])
def test_image_splits_shapes_sizes_and_disjoint(loader, size, sizes):
    seen: dict[str, set[bytes]] = {}
    counts = {}
    for split, n in sizes.items():
        X, y = loader(split)
        assert X.shape == (n, 1, size, size) and X.dtype == torch.float32
        assert y.shape == (n,) and y.dtype == torch.int64
        assert 0.0 <= float(X.min()) and float(X.max()) == 1.0
        counts[split] = torch.bincount(y, minlength=10).float()
        seen[split] = {x.numpy().tobytes() for x in X}
        assert len(seen[split]) == n  # no duplicated sample inside a split
    per_class = sum(counts.values())  # (10,)
    for split, fraction in zip(data.SPLITS, data.SPLIT_FRACTIONS):  # stratified: same share per class
        assert (counts[split] - fraction * per_class).abs().max() <= 1.0
    assert not (seen["train"] & seen["val"]) and not (seen["train"] & seen["test"]) and not (seen["val"] & seen["test"])


def test_stratified_split_is_seeded_and_balanced():
    y = torch.arange(10).repeat_interleave(50).numpy()
    a, b, c = data.stratified_split(y, seed=0), data.stratified_split(y, seed=0), data.stratified_split(y, seed=1)
    assert (a == b).all() and not (a == c).all()
    for code, per_class in enumerate((35, 5, 10)):
        assert [int(((a == code) & (y == k)).sum()) for k in range(10)] == [per_class] * 10


@pytest.mark.parametrize("call", [
    lambda: data.load_mnist("validation"), lambda: data.load_digits8x8("dev"),
    lambda: data.corpus_documents("eval"), lambda: data.lm_tokens("valid"),
    lambda: data.corpus_sentences(3, split="training"), lambda: data.load_text_split("zoo", "Train"),
])
def test_unknown_split_lists_accepted(call):
    with pytest.raises(ValueError, match="accepted: train, val, test"):
        call()


def test_snapshot_files_match_manifest():
    for rel in (data.CORPUS_FILE, data.TOKENIZER_FILE, data.MNIST_FILE):
        raw = (REPO / "data" / rel).read_bytes()
        assert hashlib.sha256(raw).hexdigest() == MANIFEST["files"][rel]["sha256"], rel
        assert len(raw) == MANIFEST["files"][rel]["bytes"]
    assert gzip.decompress((REPO / "data" / data.CORPUS_FILE).read_bytes())[:1] == b"{"


def test_corpus_splits_are_disjoint_and_recorded():
    docs = {s: data.corpus_documents(s) for s in data.SPLITS}
    recorded = MANIFEST["data"]["corpus"]
    assert {s: len(d) for s, d in docs.items()} == recorded["split_documents"]
    assert {s: sum(map(len, d)) for s, d in docs.items()} == recorded["split_chars"]
    assert not (set(docs["train"]) & set(docs["val"])) and not (set(docs["train"]) & set(docs["test"]))
    assert 0.85 < len(docs["train"]) / sum(map(len, docs.values())) < 0.95
    assert all(len(d.split()) >= 8 and d == d.strip() for d in docs["val"])


@pytest.mark.skipif(platform.python_version() != MANIFEST["data"]["corpus"]["python"],
                    reason="the stdlib text differs between Python versions")
def test_corpus_snapshot_is_byte_reproducible(tmp_path):
    spec = importlib.util.spec_from_file_location("snapshot_data", REPO / "scripts" / "snapshot_data.py")
    snapshot = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(snapshot)
    snapshot.write_corpus(snapshot.collect_documents(), tmp_path / "corpus.jsonl.gz")
    assert (tmp_path / "corpus.jsonl.gz").read_bytes() == (REPO / "data" / data.CORPUS_FILE).read_bytes()


def test_tokenizer_round_trip_and_hf_wrapper():
    tok, hf = data.load_tokenizer(), data.load_hf_tokenizer()
    assert tok.get_vocab_size() == 4096 and tok.token_to_id(data.EOT) == 0
    text = data.corpus_documents("val")[0]
    ids = tok.encode(text).ids
    assert tok.decode(ids) == text and len(ids) < len(text) / 2  # BPE compresses English
    assert hf(text)["input_ids"] == ids and hf.eos_token_id == hf.pad_token_id == 0


def test_lm_tokens_join_documents_with_eot():
    ids = data.lm_tokens("val")
    assert ids.dtype == torch.int64 and ids.dim() == 1 and int(ids.max()) < 4096
    assert int((ids == 0).sum()) == len(data.corpus_documents("val")) and int(ids[-1]) == 0
    ids[:] = 7  # callers get a copy: the cache must not change
    assert int((data.lm_tokens("val") == 0).sum()) == len(data.corpus_documents("val"))


def test_corpus_sentences_are_seeded_plain_sentences():
    a, b, c = data.corpus_sentences(50), data.corpus_sentences(50), data.corpus_sentences(50, seed=1)
    assert a == b and a != c and len(set(a)) == 50
    assert all(5 <= len(s.split()) <= 40 and s[0].isupper() and s[-1] in ".!?" for s in a)
    with pytest.raises(ValueError, match="n must be in 1.."):
        data.corpus_sentences(10**6)


def test_load_text_split_sources():
    assert data.load_text_split("zoo", "val") == data.corpus_documents("val")
    with pytest.raises(ValueError, match="accepted: zoo, wikitext-2"):
        data.load_text_split("c4", "val")
    if importlib.util.find_spec("datasets") is None:
        with pytest.raises(ImportError, match="pip install datasets"):
            data.load_text_split("wikitext-2", "val")


def test_minilm_loads_offline():
    path = data.minilm_path()
    assert (path / "model.safetensors").exists()
    model, tokenizer = data.load_minilm()
    assert sum(p.numel() for p in model.parameters()) == 22_713_216 and not model.training
    batch = tokenizer(["A short sentence."], return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**batch).last_hidden_state
    assert hidden.shape == (1, batch["input_ids"].shape[1], 384)


def test_data_file_corruption_and_absence_are_caught(monkeypatch, tmp_path):
    _copy_with_manifest([data.MNIST_FILE], tmp_path)
    monkeypatch.setenv("LESSONS_DATA_DIR", str(tmp_path))
    assert data.load_mnist("val")[0].shape == (500, 1, 28, 28)
    _flip_byte(tmp_path / data.MNIST_FILE)
    with pytest.raises(zoo.ChecksumError, match=r"mnist5k\.npz.*python scripts/snapshot_data\.py"):
        data.load_mnist("val")
    (tmp_path / data.MNIST_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=r"mnist5k\.npz.*python scripts/snapshot_data\.py"):
        data.load_mnist("val")


# ----------------------------------------------------------------------------- teachers
def test_unknown_teacher_lists_accepted():
    for call in (lambda: zoo.load_teacher("bert"), lambda: zoo.teacher_files("cnn"), lambda: zoo.build("gpt")):
        with pytest.raises(ValueError, match="accepted: vision, lm, moe"):
            call()
    with pytest.raises(SystemExit):
        zoo.main(["build", "resnet", "--steps", "1"])


def test_configs_validate_themselves():
    with pytest.raises(ValueError, match="divisible"):
        teachers.CausalLMConfig(hidden=130, heads=4)
    with pytest.raises(ValueError, match="arch must be one of"):
        teachers.CausalLMConfig(arch="gpt2")
    with pytest.raises(ValueError, match="top_k"):
        teachers.CausalLMConfig(arch="mixtral", experts=2, top_k=3)
    with pytest.raises(ValueError, match="steps must be > 0"):
        teachers.VisionConfig(steps=0)


def test_vision_teacher_reproduces_recorded_accuracy_and_fuses():
    model = zoo.load_teacher("vision")
    recorded = MANIFEST["teachers"]["vision"]["metrics"]
    X, y = data.load_mnist("test")
    acc = evaluate.accuracy(model, X, y)
    assert acc == pytest.approx(recorded["test_accuracy"], abs=1e-3) and acc >= 0.97
    assert (REPO / "data" / "vision_teacher.safetensors").stat().st_size < 1_000_000
    fused = torch.ao.quantization.fuse_modules(model, teachers.SmallCNN.FUSE_GROUPS)
    assert isinstance(fused.features[3], torch.nn.MaxPool2d) and not isinstance(fused.features[1], torch.nn.BatchNorm2d)
    with torch.inference_mode():
        torch.testing.assert_close(fused(X[:64]), zoo.load_teacher("vision")(X[:64]), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["lm", "moe"])
def test_lm_teachers_reproduce_recorded_perplexity(name):
    model = zoo.load_teacher(name)
    recorded = MANIFEST["teachers"][name]["metrics"]
    ppl = evaluate.perplexity(model, data.lm_tokens("val"), block_size=recorded["block_size"])
    assert ppl == pytest.approx(recorded["val_perplexity"], rel=1e-4)
    assert ppl <= recorded["unigram_val_perplexity"] / 2
    assert (REPO / "data" / f"{name}_teacher" / "model.safetensors").stat().st_size <= 25_000_000


def test_lm_teacher_is_a_complete_hf_folder():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = REPO / "data" / "lm_teacher"
    model, tok = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    assert model.config.num_hidden_layers == 12 and model.config.vocab_size == 4096
    assert model.config.tie_word_embeddings and model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert tok("Return the value.")["input_ids"] == data.load_tokenizer().encode("Return the value.").ids
    out = model.generate(**tok("Return the", return_tensors="pt"), max_new_tokens=5, do_sample=False)
    assert out.shape == (1, len(tok("Return the")["input_ids"]) + 5)


def test_moe_teacher_layout_and_uneven_usage():
    model = zoo.load_teacher("moe")
    cfg = model.config
    assert cfg.num_local_experts >= 8 and cfg.num_experts_per_tok == 2
    block = model.model.layers[0].mlp
    E, H, I = cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size
    assert block.experts.gate_up_proj.shape == (E, 2 * I, H) and block.experts.down_proj.shape == (E, H, I)
    assert block.gate.weight.shape == (E, H)
    recorded = MANIFEST["teachers"]["moe"]["metrics"]["expert_usage_val"]
    usage = moe.expert_usage(model, data.lm_tokens("val"), block_size=recorded_block_size("moe"))
    assert usage.shape == (cfg.num_hidden_layers, E)
    torch.testing.assert_close(usage.sum(-1), torch.ones(cfg.num_hidden_layers))
    torch.testing.assert_close(usage, torch.tensor(recorded["usage"]), atol=2e-6, rtol=0)
    assert max(recorded["cv_per_layer"]) > 0.5  # uneven, as lesson 08 needs


def test_expert_usage_matches_router_choices_seen_by_hooks():
    torch.manual_seed(0)
    cfg = teachers.CausalLMConfig(arch="mixtral", layers=2, hidden=32, intermediate=16, heads=2, context=16,
                                  vocab_size=64, experts=4, top_k=2)
    model = teachers.build_causal_lm(cfg).eval()
    tokens = torch.randint(0, 64, (16 * 5,))
    counts = torch.zeros(2, 4)

    def hook(layer):  # the router returns (logits, top-k weights, top-k indices)
        def record(module, args, out):
            counts[layer] += torch.bincount(out[2].flatten(), minlength=4).float()
        return record

    handles = [layer.mlp.gate.register_forward_hook(hook(i)) for i, layer in enumerate(model.model.layers)]
    usage = moe.expert_usage(model, tokens, block_size=16, batch_size=2)
    for h in handles:
        h.remove()
    torch.testing.assert_close(usage, counts / counts.sum(-1, keepdim=True))
    summary = moe.usage_summary(torch.tensor([[0.5, 0.25, 0.125, 0.125], [0.5, 0.5, 0.0, 0.0]]))
    assert summary["max_min_ratio_per_layer"] == [4.0, None] and summary["unused_experts_per_layer"] == [0, 2]
    assert summary["cv_per_layer"] == [pytest.approx(0.6124, abs=1e-4), 1.0] and summary["min_usage"] == 0.0


@pytest.mark.parametrize("name", ["vision", "lm"])
def test_corrupt_or_missing_checkpoint_is_caught(name, tmp_path):
    files = zoo.teacher_files(name)
    _copy_with_manifest(files, tmp_path)
    weights = next(f for f in files if f.endswith(".safetensors"))
    _flip_byte(tmp_path / weights)
    with pytest.raises(zoo.ChecksumError, match=rf"{weights}.*python -m lessons_lib\.zoo build {name}"):
        zoo.load_teacher(name, directory=tmp_path)
    (tmp_path / weights).unlink()
    with pytest.raises(FileNotFoundError, match=rf"{weights}.*python -m lessons_lib\.zoo build {name}"):
        zoo.load_teacher(name, directory=tmp_path)


@pytest.fixture(scope="module")
def smoke_zoo(tmp_path_factory):
    """All three teachers built for 3 steps by the CLI into a temporary folder."""
    out = tmp_path_factory.mktemp("zoo")
    quick = ["--steps", "3", "--out", str(out), "--threads", "1", "--eval-tokens", "1024"]
    zoo.main(["build", "lm", *quick])
    zoo.main(["build", "moe", *quick])
    subprocess.run([sys.executable, "-m", "lessons_lib.zoo", "build", "vision", *quick], check=True, cwd=REPO,
                   capture_output=True)
    return out


@pytest.mark.parametrize("name", ["vision", "lm", "moe"])
def test_smoke_build_writes_a_loadable_checkpoint(smoke_zoo, name):
    manifest = json.loads((smoke_zoo / "manifest.json").read_text())
    entry = manifest["teachers"][name]
    assert entry["config"]["steps"] == 3 and entry["build_seconds"] > 0 and entry["threads"] == 1
    for rel in zoo.teacher_files(name):
        assert manifest["files"][rel]["sha256"] == data.sha256_file(smoke_zoo / rel)
    model = zoo.load_teacher(name, directory=smoke_zoo)
    assert not model.training
    if name == "vision":
        assert evaluate.accuracy(model, *data.load_mnist("val")) == pytest.approx(entry["metrics"]["val_accuracy"], abs=1e-3)
    else:
        with torch.inference_mode():
            logits = model(data.lm_tokens("val")[None, :16]).logits
        assert logits.shape == (1, 16, 4096) and entry["metrics"]["val_tokens"] == 1024
        assert entry["metrics"]["val_perplexity"] > MANIFEST["teachers"][name]["metrics"]["val_perplexity"]


@pytest.mark.parametrize("name", ["vision", "lm", "moe"])
def test_shipped_teachers_were_built_from_the_current_recipes(name):
    recipe = json.loads(json.dumps(dataclasses.asdict(zoo.recipe(name))))  # tuples -> lists
    assert MANIFEST["teachers"][name]["config"] == recipe
    assert MANIFEST["teachers"][name]["files"] == zoo.teacher_files(name)
