"""Tests of data-parallel training (lessons_lib.training.run under Accelerate, lessons_lib.scale)
and of GPTQ's offloaded block walk (lessons_lib.gptq.Offload). CPU only.

The two-process test launches ``torchrun`` with 2 gloo processes (about 15-25 s on a busy 2-core
machine); everything else runs in this process.
"""
from __future__ import annotations

import copy
import os
import re
import subprocess
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from torch import nn
from tqdm.auto import tqdm

from lessons_lib import gptq, scale, training

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- single process: nothing changed
def _previous_run(objective, batches, steps, lr_at, params, optimizer="adamw", weight_decay=0.0, decays=None,
                  betas=(0.9, 0.999), grad_clip=None, on_step=None, progress=False, desc="train"):
    """training.run as it was before it learned to run under an accelerator, verbatim."""
    params = list(params)
    groups = params
    if decays is not None:
        groups = [{"params": [p for p in params if decays(p)], "weight_decay": weight_decay},
                  {"params": [p for p in params if not decays(p)], "weight_decay": 0.0}]
        groups = [g for g in groups if g["params"]]
    if optimizer == "sgd":
        opt = torch.optim.SGD(groups, lr=lr_at(0), momentum=0.9, weight_decay=weight_decay)
    else:
        opt = torch.optim.AdamW(groups, lr=lr_at(0), betas=betas, weight_decay=weight_decay)
    history = defaultdict(list)
    batches = iter(batches)
    bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False)
    for step in bar:
        rate = lr_at(step)
        for group in opt.param_groups:
            group["lr"] = rate
        try:
            loss, parts = objective(next(batches))
        except StopIteration:
            raise ValueError(f"batches ran out after {step} of {steps} steps") from None
        if not torch.isfinite(loss.detach()):
            raise FloatingPointError("non-finite")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip is not None:
            nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
        for key, value in parts.items():
            history[key].append(value)
        history["lr"].append(rate)
        if on_step is not None and on_step(step, float(loss.detach())):
            break
    return dict(history)


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.Tanh(), nn.Linear(16, 3))


def _batches(n=12, rows=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(rows, 6, generator=g), torch.randint(0, 3, (rows,), generator=g)) for _ in range(n)]


def _assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), f"{name} differs"


@pytest.mark.parametrize("options", [dict(optimizer="adamw", grad_clip=0.5, weight_decay=0.1, decays=training.matrices_only),
                                     dict(optimizer="sgd", weight_decay=1e-3), dict(optimizer="adamw", betas=(0.9, 0.95))],
                         ids=["adamw-clip-decays", "sgd", "adamw"])
def test_run_without_an_accelerator_is_bit_identical_to_the_previous_loop(options):
    new, old = _mlp(), _mlp()
    stops = []
    h_new = training.run(training.Supervised(new), _batches(), 12, lambda s: 0.05 * 0.9**s, new.parameters(),
                         on_step=lambda s, loss: stops.append(loss) or s == 9, **options)
    ref = training.Supervised(old)
    h_old = _previous_run(ref, _batches(), 12, lambda s: 0.05 * 0.9**s, old.parameters(), on_step=lambda s, loss: s == 9, **options)
    _assert_same_weights(new, old)
    assert h_new == h_old and len(h_new["lr"]) == 10 and stops == h_new["loss"]


def test_supervised_is_qat_fine_tunes_objective():
    from lessons_lib import qat

    a, b = _mlp(), _mlp()
    qat.fine_tune(a, _batches(), 6, 0.05, optimizer="adamw")
    b.train()
    training.run(training.Supervised(b), _batches(), 6, lambda s: 0.05, [p for p in b.parameters() if p.requires_grad], optimizer="adamw")
    _assert_same_weights(a, b)


@pytest.fixture
def one_process_accelerator():
    accelerate = pytest.importorskip("accelerate")
    from accelerate.state import AcceleratorState

    yield accelerate.Accelerator(cpu=True)
    AcceleratorState._reset_state(True)  # leave no accelerator state behind for other tests


def test_a_one_process_accelerator_is_a_no_op_bit_for_bit(one_process_accelerator):
    a, b = _mlp(), _mlp()
    options = dict(optimizer="adamw", grad_clip=0.5, weight_decay=0.1, decays=training.matrices_only)
    h_a = training.run(training.Supervised(a), _batches(), 12, lambda s: 0.05, a.parameters(), **options)
    h_b = training.run(training.Supervised(b), _batches(), 12, lambda s: 0.05, b.parameters(), accelerator=one_process_accelerator, **options)
    _assert_same_weights(a, b)
    assert h_a == h_b


def test_qat_under_a_one_process_accelerator_equals_qat_fine_tune_bit_for_bit(one_process_accelerator):
    # lesson 04's LM QAT on the zoo LM: the accelerated path (training.Supervised + run) against qat.fine_tune
    config = scale.ScaleConfig(task="qat", steps=2, batch_size=2, block=16)
    plain, h_plain = scale.train(config)
    accelerated, h_acc = scale.train(config, one_process_accelerator)
    _assert_same_weights(plain, accelerated)
    assert h_plain == h_acc


def test_shard_batch_gives_each_process_its_contiguous_rows_and_refuses_uneven_splits():
    x, y = torch.arange(12).reshape(6, 2), torch.arange(6)
    parts = [training.shard_batch((x, {"y": y}, "tag"), i, 3) for i in range(3)]
    assert torch.equal(torch.cat([p[0] for p in parts]), x) and torch.equal(torch.cat([p[1]["y"] for p in parts]), y)
    assert torch.equal(parts[1][1]["y"], torch.tensor([2, 3])) and parts[2][2] == "tag"
    assert training.shard_batch(x, 0, 1) is not None and torch.equal(training.shard_batch(x, 0, 1), x)
    with pytest.raises(ValueError, match="6 rows cannot be split evenly over 4 processes"):
        training.shard_batch((x, y), 0, 4)
    with pytest.raises(ValueError, match="same number of rows"):
        training.shard_batch((x, y[:3]), 0, 3)
    with pytest.raises(ValueError, match=r"index in \[0, count\)"):
        training.shard_batch(x, 2, 2)


def test_run_with_an_accelerator_needs_a_module_objective_that_owns_params(one_process_accelerator):
    model = _mlp()
    closure = lambda b: (nn.functional.cross_entropy(model(b[0]), b[1]), {})  # noqa: E731
    with pytest.raises(ValueError, match="objective must be an nn.Module"):
        training.run(closure, _batches(), 1, lambda s: 0.1, model.parameters(), accelerator=one_process_accelerator)
    with pytest.raises(ValueError, match="params must be parameters of objective"):
        training.run(training.Supervised(model), _batches(), 1, lambda s: 0.1, _mlp().parameters(), accelerator=one_process_accelerator)


# ----------------------------------------------------------------------------- two processes (torchrun, gloo)


def test_two_processes_give_the_one_process_weights(tmp_path):
    # lesson 05's 12 -> 6 layer LM student, teacher-only KD; same global batch, seed and steps
    config = scale.ScaleConfig(task="distill", steps=3, batch_size=4, block=32)
    with ThreadPoolExecutor(1) as pool:  # the launch waits on its processes while this one trains
        launched = pool.submit(scale.launch, config, scale.LaunchConfig(processes=2, device="cpu"), tmp_path / "two")
        student, history = scale.train(config)  # one process: distill.train, the lesson's own path
        summary = launched.result()
    assert summary["processes"] == 2 and summary["distributed_type"] == "MULTI_CPU" and summary["steps"] == 3
    two = scale.load_weights(tmp_path / "two")
    one = {k: v.detach() for k, v in student.state_dict().items()}
    assert scale.max_relative_difference(two, one) < 1e-5
    assert summary["history"]["loss"] == pytest.approx(history["loss"], rel=1e-5)


# ----------------------------------------------------------------------------- bad input, before any process starts
@pytest.fixture
def nothing_starts(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"a process was started: {args}")

    monkeypatch.setattr(subprocess, "run", refuse)
    monkeypatch.setattr(subprocess, "Popen", refuse)


def _launch_fails(tmp_path, match, launch_config, config=scale.ScaleConfig(steps=1)):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=match):
        scale.launch(config, launch_config, out)
    assert not out.exists(), "bad input must leave nothing on disk"


def test_more_processes_than_cpu_cores_is_refused(tmp_path, nothing_starts):
    cores = os.cpu_count()
    _launch_fails(tmp_path, rf"--processes {cores + 1}: this machine has {cores} CPU core\(s\); accepted: 1 to {cores}",
                  scale.LaunchConfig(processes=cores + 1, device="cpu"))


def test_more_processes_than_visible_gpus_is_refused(tmp_path, nothing_starts, monkeypatch):
    monkeypatch.setattr(scale, "_visible_gpus", lambda: 2)
    _launch_fails(tmp_path, r"--processes 3: 2 GPU\(s\) visible; accepted: 1 to 2", scale.LaunchConfig(processes=3, device="cuda"))


def test_cuda_without_a_gpu_is_refused(tmp_path, nothing_starts, monkeypatch):
    monkeypatch.setattr(scale, "_visible_gpus", lambda: 0)
    _launch_fails(tmp_path, r"--device cuda: no GPU is visible", scale.LaunchConfig(processes=1, device="cuda"))


def test_a_missing_accelerate_config_is_refused(tmp_path, nothing_starts):
    _launch_fails(tmp_path, r"--config: no such file .*nowhere.yaml.*fsdp.yaml",
                  scale.LaunchConfig(processes=1, device="cpu", config_file=tmp_path / "nowhere.yaml"))


def test_an_fsdp_config_on_a_cpu_is_refused(tmp_path, nothing_starts, monkeypatch):
    monkeypatch.setattr(scale, "_visible_gpus", lambda: 0)
    fsdp = REPO / "configs" / "accelerate" / "fsdp.yaml"
    _launch_fails(tmp_path, r"--config: .*fsdp.yaml is a GPU config \(distributed_type FSDP\) but this run is on the CPU.*"
                            r"FSDP shards a model over GPUs", scale.LaunchConfig(processes=2, device="auto", config_file=fsdp))


def test_a_batch_the_processes_do_not_divide_is_refused(tmp_path, nothing_starts):
    _launch_fails(tmp_path, r"--batch-size 5 cannot be split evenly over --processes 2", scale.LaunchConfig(processes=2, device="cpu"),
                  scale.ScaleConfig(batch_size=5))


@pytest.mark.parametrize("argv, match", [
    (["distill", "--processes", "999999"], "--processes 999999: this machine has"),
    (["distill", "--config", "missing.yaml"], "--config: no such file"),
    (["distill", "--steps", "0"], r"--steps must be an int >= 1"),
    (["qat", "--bits", "5"], r"--bits must be one of \(2, 3, 4, 8\)"),
    (["distill", "--block", "512"], r"--block must be an int in \[2, 128\]"),
    (["distill", "--device", "tpu"], r"argument --device: invalid choice: 'tpu'"),
    (["prune"], r"argument task: invalid choice: 'prune'"),
])
def test_the_cli_names_the_option_and_exits_2_before_starting_anything(argv, match, capsys, nothing_starts, monkeypatch, tmp_path):
    monkeypatch.setattr(scale, "_visible_gpus", lambda: 0)
    with pytest.raises(SystemExit) as exit_:
        scale.main([*argv, "--out", str(tmp_path / "out")])
    assert exit_.value.code == 2
    assert re.search(match, capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_configs_are_refused_by_name():
    with pytest.raises(ValueError, match=r"task must be one of \('distill', 'qat'\)"):
        scale.ScaleConfig(task="prune")
    with pytest.raises(ValueError, match="--processes must be an int >= 1"):
        scale.LaunchConfig(processes=0)
    with pytest.raises(ValueError, match=r"--device must be one of \('auto', 'cpu', 'cuda'\)"):
        scale.LaunchConfig(device="gpu")


def test_shipped_accelerate_configs_parse_say_what_fits_and_launch_with_accelerate(tmp_path, monkeypatch):
    from accelerate.commands.config.config_args import load_config_from_file

    monkeypatch.setattr(scale, "_visible_gpus", lambda: 8)
    for name, kind in (("ddp.yaml", "MULTI_GPU"), ("fsdp.yaml", "FSDP")):
        path = REPO / "configs" / "accelerate" / name
        assert str(load_config_from_file(str(path)).distributed_type).endswith(kind)
        assert "Which models fit" in path.read_text()
        checked = scale.plan(scale.ScaleConfig(), scale.LaunchConfig(processes=8, device="auto", config_file=path), tmp_path)
        assert checked.device == "cuda" and checked.launcher == "accelerate launch"
        assert checked.command[1:5] == ["-m", "accelerate.commands.launch", "--config_file", str(path)]
        assert checked.command[checked.command.index("--num_processes") + 1] == "8"
    cpu = scale.plan(scale.ScaleConfig(), scale.LaunchConfig(processes=2, device="cpu"), tmp_path)
    assert cpu.launcher == "torchrun" and "--standalone" in cpu.command and cpu.command[-2:] == ["--worker", str(tmp_path.resolve())]


# ----------------------------------------------------------------------------- GPTQ, offloaded block by block
def _tiny_llama(layers=3, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=4, max_position_embeddings=16, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("store", gptq.STORES)
@pytest.mark.parametrize("config", [gptq.GPTQConfig(bits=4), gptq.GPTQConfig(bits=3, group_size=16, act_order=True)], ids=str)
def test_offloaded_gptq_gives_the_in_memory_codes_and_weights_exactly(store, config, tmp_path):
    model = _tiny_llama()
    calibration = torch.randint(0, 64, (6, 16), generator=torch.Generator().manual_seed(1))
    in_memory, offloaded = copy.deepcopy(model), copy.deepcopy(model)
    expected = gptq.quantize_model_(in_memory, calibration, config, batch_size=4)
    offload = gptq.Offload(device="cpu", store=store, folder=tmp_path / "blocks" if store == "disk" else None)
    got = gptq.quantize_model_(offloaded, calibration, config, batch_size=4, offload=offload)
    assert list(got) == list(expected)
    for name, q in expected.items():
        for field in ("qweight", "scale", "zero_point"):
            assert torch.equal(getattr(got[name], field), getattr(q, field)), (name, field)
        assert got[name].loss == q.loss
    for (name, a), b in zip(in_memory.state_dict().items(), offloaded.state_dict().values()):
        assert b.device.type == "cpu" and torch.equal(a, b), name
    assert offloaded.lm_head.weight is offloaded.model.embed_tokens.weight  # the tie survives
    if store == "disk":
        assert sorted(p.name for p in (tmp_path / "blocks").iterdir()) == [f"block_{i:04d}.safetensors" for i in range(3)]


def test_only_the_block_being_processed_is_in_memory_with_a_disk_store(tmp_path):
    model = _tiny_llama()
    blocks = gptq.decoder_layers(model)
    seen = []

    def process(name, linear, H):
        i = int(name.split(".")[2])  # model.layers.<i>....
        seen.append([next(b.parameters()).device.type for b in blocks])
        assert linear.weight.device.type == "cpu" and H.device.type == "cpu"
        return i

    calibration = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    out = gptq.sequential_(model, calibration, process, batch_size=2,
                           offload=gptq.Offload(device="cpu", store="disk", folder=tmp_path))
    per_block = {i: [s for s, (name, j) in zip(seen, out.items()) if j == i] for i in range(3)}
    for i, states in per_block.items():
        assert states and all(s == ["meta" if j != i else "cpu" for j in range(3)] for s in states)
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_offload_options_are_checked_before_any_block_moves(tmp_path):
    with pytest.raises(ValueError, match=r"store must be one of \('cpu', 'disk'\)"):
        gptq.Offload(device="cpu", store="ram")
    with pytest.raises(ValueError, match="store='disk' needs folder"):
        gptq.Offload(device="cpu", store="disk")
    with pytest.raises(ValueError, match="device must be a device name"):
        gptq.Offload(device="gpu0")
    model = _tiny_llama(layers=2)
    before = copy.deepcopy(model.state_dict())
    calibration = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"device 'cuda': 0 CUDA device\(s\) visible"):
            gptq.quantize_model_(model, calibration, gptq.GPTQConfig(), offload=gptq.Offload(device="cuda"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file; pass a folder"):
        gptq.quantize_model_(model, calibration, gptq.GPTQConfig(), offload=gptq.Offload(device="cpu", store="disk", folder=tmp_path / "file"))
    for k, v in model.state_dict().items():
        assert v.device.type == "cpu" and torch.equal(v, before[k])
