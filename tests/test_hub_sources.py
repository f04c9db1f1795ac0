"""Hub sources of the teachers, offline: a simulated Hugging Face cache, and the refusal without one."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lessons_lib import zoo


def _fake_hub_cache(home: Path, repo_id: str, model) -> None:
    """Save ``model`` where huggingface_hub looks for ``repo_id``: hub/models--org--name/snapshots/<rev>/."""
    rev = "0123456789abcdef0123456789abcdef01234567"
    repo = home / "hub" / ("models--" + repo_id.replace("/", "--"))
    model.save_pretrained(repo / "snapshots" / rev)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(rev)


def _run_offline(home: Path, code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_a_cached_hub_model_loads_offline_with_the_same_logits(tmp_path, arch):
    from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32))
    else:
        model = OPTForCausalLM(OPTConfig(vocab_size=64, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                         num_attention_heads=2, max_position_embeddings=32, word_embed_proj_dim=32))
    repo_id = f"course-test/tiny-{arch}"
    _fake_hub_cache(tmp_path, repo_id, model.eval())
    ids = [[1, 5, 9, 3, 7]]
    with torch.no_grad():
        expected = model(torch.tensor(ids)).logits[0, -1].tolist()
    code = (f"import json, torch; from lessons_lib import zoo; m = zoo.load_teacher('lm', source={repo_id!r}); "
            f"print(json.dumps(m(torch.tensor({ids})).logits[0, -1].tolist()))")
    done = _run_offline(tmp_path, code)
    assert done.returncode == 0, done.stderr[-2000:]
    torch.testing.assert_close(torch.tensor(json.loads(done.stdout.strip().splitlines()[-1])), torch.tensor(expected))


def test_an_uncached_hub_id_offline_is_refused_at_once_with_what_to_do(tmp_path):
    code = ("import time; from lessons_lib import zoo; t = time.perf_counter()\n"
            "try:\n    zoo.load_teacher('lm', source='facebook/opt-125m')\n"
            "except zoo.SourceUnavailable as e:\n    print(f'{time.perf_counter() - t:.3f}'); print(e)\n")
    done = _run_offline(tmp_path, code)
    assert done.returncode == 0, done.stderr[-2000:]
    seconds, message = done.stdout.strip().split("\n", 1)
    assert float(seconds) < 5  # no network attempt, no download
    assert "not in the local Hugging Face cache" in message and "HF_HUB_OFFLINE" in message and "'zoo'" in message
    assert not (tmp_path / "hub").exists() or not any((tmp_path / "hub").iterdir())  # nothing written to the cache


@pytest.mark.parametrize("name, source, match", [("lm", "not a model id", "hub id such as"), ("vision", "facebook/opt-125m", "no hub source")])
def test_sources_of_no_accepted_form_are_refused(name, source, match):
    with pytest.raises(ValueError, match=match):
        zoo.check_source(name, source)


def test_a_local_folder_is_accepted_and_the_zoo_never_looks_at_the_hub(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    zoo.check_source("lm", str(tmp_path))
    start = time.perf_counter()
    zoo.check_source("lm", "zoo")
    assert time.perf_counter() - start < 0.1


# --- The lessons that take `lm_source`, run end to end on a simulated hub cache (the path users with internet take).

LESSON_SETTINGS = {  # small values of each lesson's own parameters, so that the hub tests stay well under two minutes
    "01_precision_formats": {"quick_images": 50, "quick_lm_blocks": 2, "latency_repeats": 2, "matmul_size": 128},
    "03_gptq": {"calibration_samples": 16, "calibration_seeds": 2, "eval_blocks": 8, "eval_window": 128,
                "run_gptqmodel": False, "timing_repeats": 1, "group_size": 32, "rule_bits": [3], "minilm_bits": [3],
                "minilm_calibration": 16, "minilm_test": 32},
}


def _tiny(arch: str, vocab_size: int):
    from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                                            tie_word_embeddings=True))
    return OPTForCausalLM(OPTConfig(vocab_size=vocab_size, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                                    num_attention_heads=4, max_position_embeddings=128, word_embed_proj_dim=64,
                                    bos_token_id=0, eos_token_id=0, pad_token_id=0))


@pytest.fixture(scope="module")
def hub_home(tmp_path_factory):
    """A Hugging Face cache holding two made-up hub models, course-test/tiny-llama and course-test/tiny-opt, each
    with the course's tokenizer and briefly trained on the course's text (random weights would make every
    quantization comparison noise), in the layout huggingface_hub reads offline."""
    from lessons_lib import data, training

    home = tmp_path_factory.mktemp("hf_home")
    tokenizer, ids = data.load_hf_tokenizer(), data.lm_tokens("train")
    for arch in ("llama", "opt"):
        model = _tiny(arch, len(tokenizer)).train()

        def objective(batch, model=model):
            x, y = batch
            loss = torch.nn.functional.cross_entropy(model(x).logits.flatten(0, 1), y.flatten())
            return loss, {"loss": float(loss)}

        windows = data.lm_windows(ids, 64, 16, torch.Generator().manual_seed(0))
        training.run(objective, windows, 100, lambda step: 3e-3, model.parameters())
        _fake_hub_cache(home, f"course-test/tiny-{arch}", model.eval())
        snapshot = next((home / "hub" / f"models--course-test--tiny-{arch}" / "snapshots").iterdir())
        tokenizer.save_pretrained(snapshot)
    return home


# Each lesson once and each architecture once (the Llama path of lesson 03 is the zoo LM's, run by nbmake).
@pytest.mark.parametrize("stem, arch", [("01_precision_formats", "llama"), ("03_gptq", "opt")])
def test_lessons_run_end_to_end_on_a_cached_hub_model_offline(hub_home, stem, arch, tmp_path, monkeypatch):
    import papermill

    from lessons_lib import course, results, runner

    for key, value in {"HF_HOME": str(hub_home), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}.items():
        monkeypatch.setenv(key, value)  # the kernel inherits them
    lesson = next(l for l in course.discover() if l.stem == stem)
    source = f"course-test/tiny-{arch}"
    parameters = {"lm_source": source, "results_dir": str(tmp_path / "results"), **LESSON_SETTINGS[stem]}
    papermill.execute_notebook(str(lesson.path), str(tmp_path / "out.ipynb"), parameters=parameters,
                               cwd=str(lesson.path.parent), progress_bar=False,
                               kernel_manager_class=runner._ipc_kernel_manager())
    record = results.load(tmp_path / "results" / f"{stem}.json")
    assert record["parameters"]["lm_source"] == source
    ppl = record["metrics"]["fp32_ppl" if stem.startswith("01") else "ppl_fp32"]
    assert 1 < ppl < 4096, "a trained model's perplexity is below the vocabulary size's"
