"""Tests of lessons_lib.onnx_export: the exported vision CNN, MiniLM and zoo Llama give PyTorch's
outputs in ONNX Runtime; static INT8 (QDQ) keeps the CNN's accuracy; models the exporter cannot
convert raise ExportError naming the module and the exporter's reason (without flooding stdout);
sessions and runs refuse missing files and mismatched inputs before running. Offline, CPU."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
import onnx  # noqa: E402

from lessons_lib import data, evaluate, gptq, onnx_export as ox, packing, session, zoo  # noqa: E402

N_TEST = 500  # MNIST test images for the INT8 accuracy check


@pytest.fixture(scope="module")
def cnn():
    return zoo.load_teacher("vision")


@pytest.fixture(scope="module")
def cnn_file(cnn, tmp_path_factory):
    X, _ = data.load_mnist("val")
    return ox.export(cnn, X[:2], tmp_path_factory.mktemp("onnx") / "cnn.onnx", input_names=["image"],
                     output_names=["logits"])


# ----------------------------------------------------------------------------- export + ORT = PyTorch
def test_cnn_logits_in_onnx_runtime_equal_pytorchs_at_another_batch_size(cnn, cnn_file):
    X, _ = data.load_mnist("test")
    sess = ox.session(cnn_file, threads=1, inputs={"image": [None, 1, 28, 28]})
    out = ox.run(sess, {"image": X[:37]})
    assert list(out) == ["logits"] and out["logits"].shape == (37, 10)
    with torch.no_grad():
        expected = cnn(X[:37]).numpy()
    assert np.abs(out["logits"] - expected).max() <= 1e-4
    assert not cnn.training  # export restored the mode


def test_minilm_sentence_embeddings_in_onnx_runtime_equal_pytorchs(tmp_path):
    bert, tokenizer = data.load_minilm()
    model = ox.SentenceEmbedder(bert).eval()
    names = ["input_ids", "attention_mask", "token_type_ids"]
    example = tokenizer(["Export with two sentences.", "Of different lengths, to pad one."], padding=True, return_tensors="pt")
    path = ox.export(model, [example[n] for n in names], tmp_path / "minilm.onnx", input_names=names,
                     output_names=["embedding"], dynamic_axes={n: {1: "tokens"} for n in names})
    batch = tokenizer(data.corpus_sentences(4, seed=1), padding=True, return_tensors="pt")
    assert batch["input_ids"].shape[1] != example["input_ids"].shape[1]  # another length than traced
    out = ox.run(ox.session(path), {n: batch[n] for n in names})["embedding"]
    with torch.no_grad():
        expected = model(*(batch[n] for n in names)).numpy()
    assert out.shape == (4, 384) and np.abs(out - expected).max() <= 1e-4


def test_the_zoo_llama_exports_with_an_attention_mask_and_matches(tmp_path):
    lm = zoo.load_teacher("lm")
    names = ["input_ids", "attention_mask"]
    ids = torch.randint(0, lm.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    wrapped = ox.OutputOf(lm, names, "logits", use_cache=False)
    with pytest.raises(ox.ExportError, match=r"aten::diff .*LlamaModel.*masking_utils.*pass attention_mask"):
        ox.export(ox.OutputOf(lm, names[:1], "logits", use_cache=False), ids, tmp_path / "no_mask.onnx",
                  input_names=names[:1], output_names=["logits"])
    path = ox.export(wrapped, (ids, torch.ones_like(ids)), tmp_path / "lm.onnx", input_names=names,
                     output_names=["logits"], dynamic_axes={n: {1: "tokens"} for n in [*names, "logits"]})
    other = torch.randint(0, lm.config.vocab_size, (3, 24), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(other)
    mask[1, 20:] = 0  # a padded row
    out = ox.run(ox.session(path), {"input_ids": other, "attention_mask": mask})["logits"]
    with torch.no_grad():
        expected = wrapped(other, mask).numpy()
    assert out.shape == (3, 24, lm.config.vocab_size) and np.abs(out - expected).max() <= 1e-4


# ----------------------------------------------------------------------------- INT8 in ONNX Runtime
def _accuracy(path, X, y) -> float:
    logits = ox.run(ox.session(path), {"image": X})["logits"]
    return float((logits.argmax(1) == y.numpy()).mean())


def test_static_int8_qdq_keeps_the_cnns_accuracy_within_one_point(cnn, cnn_file, tmp_path):
    X_val, _ = data.load_mnist("val")
    X, y = data.load_mnist("test")
    X, y = X[:N_TEST], y[:N_TEST]
    calibration = [{"image": X_val[i:i + 100]} for i in range(0, 500, 100)]  # calibrate on val, test on test
    int8 = ox.quantize_static(cnn_file, tmp_path / "cnn_int8.onnx", calibration)
    ops = {n.op_type for n in onnx.load(str(int8)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    fp32_acc, int8_acc = _accuracy(cnn_file, X, y), _accuracy(int8, X, y)
    assert fp32_acc == evaluate.accuracy(cnn, X, y)  # ORT fp32 = PyTorch, image for image
    assert fp32_acc > 0.98 and fp32_acc - int8_acc <= 0.01
    assert int8.stat().st_size < cnn_file.stat().st_size / 2
    # ONNX Runtime fuses DQ -> Conv -> Q into int8 kernels when the session starts.
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "fused.onnx")
    ort.InferenceSession(str(int8), options, providers=["CPUExecutionProvider"])
    fused = [n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node]
    assert fused.count("QLinearConv") == 3 and "Conv" not in fused


def test_dynamic_int8_turns_convolutions_into_conv_integer(cnn_file, tmp_path):
    X, y = data.load_mnist("test")
    dyn = ox.quantize_dynamic(cnn_file, tmp_path / "cnn_dyn.onnx")
    ops = {n.op_type for n in onnx.load(str(dyn)).graph.node}
    assert {"DynamicQuantizeLinear", "ConvInteger"} <= ops and "Conv" not in ops
    assert _accuracy(dyn, X[:200], y[:200]) >= _accuracy(cnn_file, X[:200], y[:200]) - 0.01


def test_quantize_refuses_bad_calibration_and_paths_before_working(cnn_file, tmp_path):
    with pytest.raises(ValueError, match=r"exactly the model's inputs \['image'\], got \['x'\]"):
        ox.quantize_static(cnn_file, tmp_path / "q.onnx", [{"x": torch.zeros(1, 1, 28, 28)}])
    with pytest.raises(ValueError, match="calibration is empty"):
        ox.quantize_static(cnn_file, tmp_path / "q.onnx", iter([]))
    with pytest.raises(ValueError, match="not one dict"):
        ox.quantize_static(cnn_file, tmp_path / "q.onnx", {"image": torch.zeros(1, 1, 28, 28)})
    with pytest.raises(ValueError, match="path_out must differ"):
        ox.quantize_dynamic(cnn_file, cnn_file)
    with pytest.raises(ValueError, match=r"weight_type must be one of \('int8', 'uint8'\)"):
        ox.quantize_dynamic(cnn_file, tmp_path / "q.onnx", weight_type="int4")
    with pytest.raises(ValueError, match="no ONNX file at"):
        ox.quantize_dynamic(tmp_path / "absent.onnx", tmp_path / "q.onnx")
    assert not (tmp_path / "q.onnx").exists()


# ----------------------------------------------------------------------------- what cannot export
def _packed_model() -> nn.Module:
    linear = nn.Linear(16, 8)
    weight = gptq.rtn(linear.weight, gptq.GPTQConfig(bits=4, group_size=8))
    return nn.Sequential(nn.ReLU(), packing.PackedLinear.from_quantized(linear, weight)).eval()


def _dynamic_int8_model() -> nn.Module:
    with session.known_noise_silenced():
        return torch.ao.quantization.quantize_dynamic(nn.Sequential(nn.Linear(16, 8)), {nn.Linear}, dtype=torch.qint8)


class _Diff(nn.Module):
    def forward(self, x):
        return torch.diff(x, dim=-1)


@pytest.mark.parametrize("build, match", [
    (_packed_model, r"contains lessons_lib.packing.PackedLinear at '1'; lessons_lib.packing.PackedLinear: "
                    r"it unpacks its int4 codes .* "
                    r"underlying error \(SymbolicValueError\): ONNX export does NOT support exporting bitwise AND"),
    (_dynamic_int8_model, r"contains torch\.ao\.nn\.quantized\.dynamic\.modules\.linear\.Linear at '0'; "
                          r".*: it is a dynamic-quantized torch.ao module.* "
                          r"underlying error \(UnsupportedOperatorError\): .*'quantized::linear_dynamic'"),
    (_Diff, r"operator aten::diff has no ONNX conversion \(in module _Diff at tests/test_onnx_export.py:\d+\)\. "
            r"underlying error \(UnsupportedOperatorError\)")])
def test_models_the_exporter_cannot_convert_raise_export_error(build, match, tmp_path, capfd):
    path = tmp_path / "bad.onnx"
    with pytest.raises(ox.ExportError, match=match) as info:
        ox.export(build(), torch.randn(3, 16), path, input_names=["x"], output_names=["y"])
    assert isinstance(info.value, ValueError) and info.value.__cause__ is not None
    assert "pass attention_mask" not in str(info.value)  # the transformers hint only for transformers
    assert not path.exists()
    assert "Torch IR graph" not in capfd.readouterr().out  # the exporter's graph dump was kept off stdout
    assert not torch._C._jit_is_onnx_log_enabled()


def test_statically_quantized_torch_ao_modules_do_export(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(torch.ao.quantization.QuantStub(), nn.Conv2d(1, 4, 3), nn.ReLU(),
                          torch.ao.quantization.DeQuantStub()).eval()
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with session.known_noise_silenced():
        model.qconfig = torch.ao.quantization.get_default_qconfig("x86")
        prepared = torch.ao.quantization.prepare(model)
        prepared(x)
        quantized = torch.ao.quantization.convert(prepared)
    path = ox.export(quantized, x, tmp_path / "ao.onnx", input_names=["x"], output_names=["y"])
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in onnx.load(str(path)).graph.node}
    with torch.no_grad():
        expected = quantized(x).numpy()
    step = quantized[1].scale  # the output's quantization step; rounding of ties may differ by one
    assert np.abs(ox.run(ox.session(path), {"x": x})["y"] - expected).max() <= step * 1.001


# ----------------------------------------------------------------------------- argument checks
@pytest.mark.parametrize("kwargs, match", [
    ({"opset": 11}, r"opset must be an int in 13\.\.20"),
    ({"input_names": ["a", "b"]}, "must name each of the 1 example inputs"),
    ({"output_names": ["x"]}, "must not overlap"),
    ({"path": "model.pt"}, r"path must end in \.onnx"),
    ({"dynamic_axes": {"z": {1: "t"}}}, "dynamic_axes names 'z', which is none of the inputs"),
    ({"example_inputs": [1.0]}, "example_inputs must be a tensor")])
def test_export_refuses_bad_arguments_before_tracing(kwargs, match, cnn, tmp_path):
    args = {"example_inputs": torch.zeros(1, 1, 28, 28), "path": tmp_path / "m.onnx",
            "input_names": ["x"], "output_names": ["y"], **kwargs}
    with pytest.raises(ValueError, match=match):
        ox.export(cnn, args.pop("example_inputs"), args.pop("path"), **args)


def test_session_refuses_missing_and_unloadable_files_and_mismatched_inputs(cnn_file, tmp_path):
    with pytest.raises(ValueError, match="no ONNX file at"):
        ox.session(tmp_path / "absent.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a protobuf")
    with pytest.raises(ValueError, match="is not a model ONNX Runtime can load"):
        ox.session(junk)
    with pytest.raises(ValueError, match=r"input 'image' has shape \['batch', 1, 28, 28\], expected \[None, 3, 28, 28\]"):
        ox.session(cnn_file, inputs={"image": [None, 3, 28, 28]})
    with pytest.raises(ValueError, match=r"has inputs image \['batch', 1, 28, 28\]; expected names \['pixels'\]"):
        ox.session(cnn_file, inputs={"pixels": [None, 1, 28, 28]})
    with pytest.raises(ValueError, match="threads must be an int >= 1"):
        ox.session(cnn_file, threads=0)
    with pytest.raises(ValueError, match="optimization must be one of"):
        ox.session(cnn_file, optimization="max")


def test_run_checks_names_shapes_and_dtypes_before_running(cnn_file):
    sess = ox.session(cnn_file)
    x = torch.zeros(2, 1, 28, 28)
    with pytest.raises(ValueError, match=r"inputs \['pixels'\] do not match the model's: image tensor\(float\)"):
        ox.run(sess, {"pixels": x})
    with pytest.raises(ValueError, match=r"has shape \[2, 1, 20, 28\], the model takes \['batch', 1, 28, 28\]"):
        ox.run(sess, {"image": x[:, :, :20]})
    with pytest.raises(ValueError, match=r"has dtype float64, the model takes tensor\(float\)"):
        ox.run(sess, {"image": x.double()})
    assert ox.run(sess, {"image": x.numpy()})["logits"].shape == (2, 10)
