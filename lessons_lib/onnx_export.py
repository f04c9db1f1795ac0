"""Leaving PyTorch: export to ONNX, run in ONNX Runtime, quantize there.

- :func:`export` writes a model with ``torch.onnx.export(..., dynamo=False)``, PyTorch's classic
  TorchScript-tracing exporter (deprecated since torch 2.9 in favour of the ``torch.export``-based
  one, which needs the extra package onnxscript; the classic one still exports the course's CNN,
  all-MiniLM-L6-v2 and the zoo Llama in torch 2.13, and needs nothing else). Tracing records the
  operations of one call on the example inputs: Python control flow is frozen at what that call
  did, and dimensions are fixed unless declared dynamic (batch by default). (PyTorch docs,
  "torch.onnx", docs.pytorch.org/docs/stable/onnx.html; ONNX operators: onnx.ai/onnx/operators.)
- A model that cannot be exported raises :class:`ExportError` naming the module type and why,
  with the exporter's own message. Known cases: ``torch.ao`` *dynamic*-quantized modules
  (``quantized::linear_dynamic`` has no ONNX symbolic) and :class:`lessons_lib.packing.PackedLinear`
  (unpacks int4 codes with int64 shifts and bitwise AND, which the exporter refuses). ``torch.ao``
  *statically* quantized modules do export (as QuantizeLinear / DequantizeLinear around float ops).
- :func:`session` opens an ONNX Runtime ``InferenceSession`` with explicit threads and graph
  optimisation level; :func:`run` checks names, ranks, fixed sizes and dtypes before running.
- :func:`quantize_dynamic` and :func:`quantize_static` call ``onnxruntime.quantization``.
  Dynamic: weights stored as int8, activations quantized at run time from each batch's own
  range; a Conv becomes ``ConvInteger`` fed by ``DynamicQuantizeLinear``, which ONNX Runtime's
  CPU kernels run slowly (often slower than fp32), so it suits MatMul-heavy transformers.
  Static: activation ranges fixed beforehand by calibration (MinMax here), stored as
  QuantizeLinear / DequantizeLinear (QDQ) pairs; at session start the graph optimiser fuses
  ``DQ -> Conv -> Q`` into a ``QLinearConv`` int8 kernel. ONNX Runtime's guide ("Quantize ONNX
  models", onnxruntime.ai/docs/performance/model-optimizations/quantization.html) recommends
  dynamic for RNNs and transformers, static for CNNs, and QDQ with signed int8 activations and
  weights (S8S8) as the first choice on x86 CPUs.

onnx and onnxruntime are imported when first needed; without them the functions say what to
install (the pins of ``requirements.txt``).
"""
from __future__ import annotations

import contextlib
import ctypes
import importlib
import os
import re
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from lessons_lib import optional
from lessons_lib.checks import is_int, require

MIN_OPSET = 13  # per-axis QuantizeLinear / DequantizeLinear (per-channel QDQ) need opset >= 13
MAX_OPSET = 20  # the classic exporter's highest opset in torch 2.13
OPTIMIZATIONS = ("disabled", "basic", "extended", "all")
QUANT_TYPES = ("int8", "uint8")
SUFFIX = ".onnx"
# ONNX Runtime's input type strings -> NumPy dtypes (the types our models take).
ORT_DTYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
              "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8,
              "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_}
# Warnings the classic exporter always gives; this module uses it on purpose (see the docstring).
EXPORTER_NOISE = (r"You are using the legacy TorchScript-based ONNX export", r"The feature will be removed",
                  r"`torch\.jit\.trace(_method)?` is deprecated")
# Operators known to block export: operator -> (text in the source location that identifies the
# known case, what to do instead).
OPERATOR_HINTS = {
    "aten::diff": ("masking_utils", "transformers computes it to detect packed sequences when no "
                                    "attention_mask is given: pass attention_mask as an input"),
}


class ExportError(ValueError):
    """A model that the ONNX exporter cannot convert; the message names the module type and why."""


def _import(module: str) -> Any:
    """Import onnx / onnxruntime, or say which pinned package to install."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        package = module.split(".")[0]
        raise ModuleNotFoundError(f"{module} is needed for ONNX export and inference: "
                                  f"pip install {optional.requirement(package)}") from err


def _known_blocker(module: nn.Module) -> str | None:
    """Why ``module`` cannot be exported, if its type is a known blocker; else None."""
    from lessons_lib.packing import PackedLinear

    if isinstance(module, PackedLinear):
        return ("it unpacks its int4 codes with bit shifts and bitwise AND on int64 tensors, which the "
                "ONNX exporter does not convert; export the float model and quantize the ONNX file instead")
    if type(module).__module__.startswith("torch.ao.nn.quantized.dynamic"):
        return ("it is a dynamic-quantized torch.ao module, whose forward calls a packed fbgemm/qnnpack "
                "kernel (quantized::linear_dynamic) with no ONNX equivalent; export the float model and "
                "use quantize_dynamic() on the ONNX file instead")
    return None


def _culprit_from_dump(operator: str, dump: str) -> str | None:
    """The module and source line of ``operator`` in the exporter's graph dump, in words."""
    for line in dump.splitlines():
        if f" = {operator}(" not in line:
            continue
        scope = re.search(r"scope: (\S+)", line)
        source = re.search(r"# (\S+?):(\d+):\d+\s*$", line)
        where = []
        if scope:
            inner = scope[1].split("/")[-1]  # e.g. transformers.models.llama.modeling_llama.LlamaModel::model
            cls, _, attr = inner.partition("::")
            where.append(f"in module {cls.split('.')[-1]}" + (f" ({attr})" if attr else ""))
        if source:
            where.append(f"at {'/'.join(Path(source[1]).parts[-2:])}:{source[2]}")
        return " ".join(where) or None
    return None


def _explain(model: nn.Module, err: Exception, dump: str, opset: int) -> str:
    """The :class:`ExportError` message: which module blocks export, why, and the exporter's words."""
    blockers = [(name or "<root>", f"{type(m).__module__}.{type(m).__qualname__}", why) for name, m in model.named_modules()
                if (why := _known_blocker(m)) is not None]
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    underlying = f"underlying error ({type(err).__name__}): {first_line[:400]}"
    head = f"cannot export {type(model).__name__} to ONNX (classic exporter, opset {opset})"
    if blockers:
        names = ", ".join(f"{n!r}" for n, _, _ in blockers[:5]) + (" ..." if len(blockers) > 5 else "")
        kinds = {t: why for _, t, why in blockers}
        reasons = "; ".join(f"{t}: {why}" for t, why in kinds.items())
        return f"{head}: it contains {', '.join(kinds)} at {names}; {reasons}. {underlying}"
    operator = re.search(r"operator '([\w:.]+)'", str(err))
    if operator:
        where = _culprit_from_dump(operator[1], dump)
        marker, hint = OPERATOR_HINTS.get(operator[1], ("", None))
        hint = hint if where and marker in where else None
        return (f"{head}: operator {operator[1]} has no ONNX conversion" + (f" ({where})" if where else "")
                + (f"; {hint}" if hint else "") + f". {underlying}")
    defined = re.search(r"node defined in (\S+)\((\d+)\): (\w+)", str(err))
    where = f" (raised for code in {defined[3]} at {Path(defined[1]).name}:{defined[2]})" if defined else ""
    return f"{head}{where}. {underlying}"


@contextlib.contextmanager
def _stdout_fd_captured(captured: list[str]) -> Iterator[None]:
    """Send what C++ code writes to file descriptor 1 into a temporary file, whose text is
    appended to ``captured`` on exit. The classic exporter dumps its whole TorchScript graph there
    when conversion fails; we read it to name the failing module instead of flooding the console."""
    try:
        saved = os.dup(1)
    except OSError:  # no usable descriptor 1: capture nothing
        yield
        return
    with tempfile.TemporaryFile(mode="w+b") as sink:
        sys.stdout.flush()
        os.dup2(sink.fileno(), 1)
        try:
            yield
        finally:
            with contextlib.suppress(Exception):
                ctypes.CDLL(None).fflush(None)  # C stdio buffers (std::cout shares them)
            os.dup2(saved, 1)
            os.close(saved)
            sink.seek(0)
            captured.append(sink.read().decode("utf-8", "replace"))


def _check_names(names: object, what: str) -> tuple[str, ...]:
    require(isinstance(names, Sequence) and not isinstance(names, str) and len(names) > 0
            and all(isinstance(n, str) and n for n in names) and len(set(names)) == len(names),
            f"{what} must be a non-empty sequence of distinct non-empty str, got {names!r}")
    return tuple(names)


def _check_onnx_path(path: object, what: str) -> Path:
    require(isinstance(path, (str, Path)), f"{what} must be a str or Path ending in {SUFFIX}, got {path!r}")
    path = Path(path)
    require(path.suffix == SUFFIX, f"{what} must end in {SUFFIX}, got {str(path)!r}")
    return path


def _existing(path: object, what: str) -> Path:
    path = _check_onnx_path(path, what)
    require(path.is_file(), f"{what}: no ONNX file at {str(path)!r}")
    return path


class OutputOf(nn.Module):
    """A Hugging Face model as a module of positional tensors returning one output, for export.

    ``OutputOf(model, ("input_ids", "attention_mask"), "logits", use_cache=False)(ids, mask)``
    returns ``model(input_ids=ids, attention_mask=mask, use_cache=False).logits``. The exporter
    passes inputs by position and wants tensors out, not a ``ModelOutput``.

    Args:
        model: the model to wrap.
        input_names: keyword of each positional input, in order.
        output: the attribute of the model's output to return ("logits", "last_hidden_state").
        **fixed: keyword arguments passed on every call.
    """

    def __init__(self, model: nn.Module, input_names: Sequence[str], output: str, **fixed: Any) -> None:
        super().__init__()
        require(isinstance(model, nn.Module), f"model must be an nn.Module, got {type(model).__name__}")
        self.input_names = _check_names(input_names, "input_names")
        require(isinstance(output, str) and output != "", f"output must be an attribute name such as 'logits', got {output!r}")
        self.model, self.output, self.fixed = model, output, fixed

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return getattr(self.model(**dict(zip(self.input_names, tensors)), **self.fixed), self.output)


class SentenceEmbedder(nn.Module):
    """A Hugging Face encoder (MiniLM) with Sentence-BERT mean pooling, for export:
    ``(input_ids, attention_mask, token_type_ids) -> (B, H)`` embeddings, what
    :func:`lessons_lib.evaluate.sentence_embeddings` computes (Reimers & Gurevych, arXiv:1908.10084)."""

    NAMES = ("input_ids", "attention_mask", "token_type_ids")

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.states = OutputOf(encoder, self.NAMES, "last_hidden_state")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        from lessons_lib import evaluate

        return evaluate.mean_pool(self.states(input_ids, attention_mask, token_type_ids), attention_mask)


def export(model: nn.Module, example_inputs: torch.Tensor | Sequence[torch.Tensor], path: str | Path, *,
           input_names: Sequence[str], output_names: Sequence[str], dynamic_batch: bool = True,
           dynamic_axes: Mapping[str, Mapping[int, str]] | None = None, opset: int = 17) -> Path:
    """Export ``model`` to an ONNX file with the classic (TorchScript-tracing) exporter.

    The model is traced in eval mode on ``example_inputs`` (its mode is restored afterwards),
    constants are folded (BatchNorm into the preceding Conv), and the file is checked with
    ``onnx.checker``.

    Args:
        model: the module; its forward takes the example inputs by position (wrap Hugging Face
            models in :class:`OutputOf`).
        example_inputs: one tensor or a sequence of tensors, one per input name.
        path: the file to write, ending in ".onnx" (parent folders are created).
        input_names, output_names: graph input and output names, distinct.
        dynamic_batch: dimension 0 of every input and output is left free ("batch").
        dynamic_axes: more free dimensions, name -> {axis: label}, e.g. ``{"input_ids": {1:
            "seq"}}`` for sequence length; merged with the batch axes.
        opset: ONNX opset, MIN_OPSET..MAX_OPSET (13..20).
    Returns:
        The path written.
    Raises:
        ValueError: bad arguments (before any tracing).
        ExportError: the exporter cannot convert the model; the message names the module type
            (or the operator and where it is) and why, and quotes the exporter's error.
    """
    require(isinstance(model, nn.Module), f"model must be an nn.Module, got {type(model).__name__}")
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else example_inputs
    require(isinstance(inputs, Sequence) and len(inputs) > 0 and all(isinstance(t, torch.Tensor) for t in inputs),
            "example_inputs must be a tensor or a non-empty sequence of tensors")
    input_names = _check_names(input_names, "input_names")
    output_names = _check_names(output_names, "output_names")
    require(len(input_names) == len(inputs),
            f"input_names must name each of the {len(inputs)} example inputs, got {list(input_names)}")
    require(not set(input_names) & set(output_names), "input_names and output_names must not overlap")
    require(isinstance(dynamic_batch, bool), f"dynamic_batch must be True or False, got {dynamic_batch!r}")
    require(is_int(opset) and MIN_OPSET <= opset <= MAX_OPSET, f"opset must be an int in {MIN_OPSET}..{MAX_OPSET}, got {opset!r}")
    path = _check_onnx_path(path, "path")
    axes: dict[str, dict[int, str]] = {n: {0: "batch"} for n in (*input_names, *output_names)} if dynamic_batch else {}
    for name, spec in (dynamic_axes or {}).items():
        require(name in input_names or name in output_names,
                f"dynamic_axes names {name!r}, which is none of the inputs {list(input_names)} or outputs {list(output_names)}")
        require(isinstance(spec, Mapping) and all(is_int(a) and a >= 0 and isinstance(lab, str) for a, lab in spec.items()),
                f"dynamic_axes[{name!r}] must map axis (int >= 0) -> label (str), got {spec!r}")
        axes.setdefault(name, {}).update(spec)
    onnx = _import("onnx")

    path.parent.mkdir(parents=True, exist_ok=True)
    was_training, log_was_on = model.training, torch._C._jit_is_onnx_log_enabled()
    model.eval()
    dump: list[str] = []
    try:
        with warnings.catch_warnings(), _stdout_fd_captured(dump), torch.no_grad():
            for pattern in EXPORTER_NOISE:
                warnings.filterwarnings("ignore", message=pattern)
            torch.onnx.export(model, tuple(inputs), str(path), input_names=list(input_names),
                              output_names=list(output_names), dynamic_axes=axes or None, opset_version=opset,
                              dynamo=False, do_constant_folding=True)
    except Exception as err:
        path.unlink(missing_ok=True)
        raise ExportError(_explain(model, err, "".join(dump), opset)) from err
    finally:
        # torch 2.13's exporter switches its C++ graph logging on and leaves it on; put it back.
        torch._C._jit_set_onnx_log_enabled(log_was_on)
        model.train(was_training)
    try:
        onnx.checker.check_model(str(path))
    except Exception as err:
        raise ExportError(f"the exported {path.name} fails onnx.checker: {err}") from err
    return path


def session(path: str | Path, threads: int = 1, *, optimization: str = "all",
            inputs: Mapping[str, Sequence[int | None]] | None = None):
    """An ONNX Runtime CPU ``InferenceSession`` with explicit threading and graph optimisation.

    ``intra_op_num_threads = threads`` (threads inside one operator), ``inter_op_num_threads = 1``
    and sequential execution (one operator at a time), so that timings compare with PyTorch at
    ``torch.set_num_threads(threads)``.

    Args:
        path: an ".onnx" file.
        threads: >= 1.
        optimization: ONNX Runtime graph optimisation level: "disabled", "basic" (constant
            folding, redundant nodes), "extended" (fusions such as attention, GELU) or "all"
            (also layout changes); QDQ -> QLinearConv fusion needs "basic" or higher.
        inputs: if given, the inputs the file must have: name -> shape, None for a dimension that
            may be anything; a mismatch raises before any run.
    Returns:
        The ``onnxruntime.InferenceSession``.
    Raises:
        ValueError: a missing file, a file ONNX Runtime cannot load, bad arguments, or inputs
            that differ from ``inputs`` (the message lists the file's inputs).
    """
    path = _existing(path, "path")
    require(is_int(threads) and threads >= 1, f"threads must be an int >= 1, got {threads!r}")
    require(optimization in OPTIMIZATIONS, f"optimization must be one of {OPTIMIZATIONS}, got {optimization!r}")
    require(inputs is None or isinstance(inputs, Mapping), f"inputs must be None or a mapping name -> shape, got {inputs!r}")
    ort = _import("onnxruntime")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = {
        "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[optimization]
    try:
        sess = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own pybind exception types
        raise ValueError(f"{str(path)!r} is not a model ONNX Runtime can load: {err}") from err
    if inputs is not None:
        have = {i.name: i.shape for i in sess.get_inputs()}
        described = ", ".join(f"{n} {s}" for n, s in have.items())
        require(set(inputs) == set(have), f"{path.name} has inputs {described}; expected names {sorted(inputs)}")
        for name, shape in inputs.items():
            fits = len(shape) == len(have[name]) and all(
                want is None or not is_int(got) or want == got for want, got in zip(shape, have[name]))
            require(fits, f"{path.name}: input {name!r} has shape {have[name]}, expected {list(shape)} "
                          f"(None or a named dimension matches any size); the file's inputs: {described}")
    return sess


def _feed(sess: Any, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Check ``inputs`` against the session's inputs; return them as NumPy arrays."""
    require(isinstance(inputs, Mapping), f"inputs must be a mapping name -> tensor, got {type(inputs).__name__}")
    spec = {i.name: i for i in sess.get_inputs()}
    described = ", ".join(f"{i.name} {i.type} {i.shape}" for i in spec.values())
    require(set(inputs) == set(spec), f"inputs {sorted(inputs)} do not match the model's: {described}")
    feed = {}
    for name, value in inputs.items():
        require(isinstance(value, (torch.Tensor, np.ndarray)), f"inputs[{name!r}] must be a tensor or array, got {type(value).__name__}")
        array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value
        want = spec[name]
        require(array.ndim == len(want.shape) and all(not is_int(d) or d == s for d, s in zip(want.shape, array.shape)),
                f"inputs[{name!r}] has shape {list(array.shape)}, the model takes {want.shape}")
        dtype = ORT_DTYPES.get(want.type)
        require(dtype is None or array.dtype == dtype,
                f"inputs[{name!r}] has dtype {array.dtype}, the model takes {want.type} ({np.dtype(dtype).name})")
        feed[name] = np.ascontiguousarray(array)
    return feed


def run(sess: Any, inputs: Mapping[str, torch.Tensor | np.ndarray]) -> dict[str, np.ndarray]:
    """Run a session on named inputs; return output name -> array.

    Raises:
        ValueError: input names that differ from the model's, or a wrong rank, fixed size or
            dtype (the message lists what the model takes) — checked before running.
    """
    require(hasattr(sess, "get_inputs") and hasattr(sess, "run"), f"sess must be an InferenceSession (see session()), got {type(sess).__name__}")
    feed = _feed(sess, inputs)
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feed)))


def _graph_inputs(path: Path) -> list[str]:
    """Names of the real inputs of an ONNX file (initializers listed as inputs excluded)."""
    onnx = _import("onnx")
    graph = onnx.load(str(path), load_external_data=False).graph
    weights = {t.name for t in graph.initializer}
    return [i.name for i in graph.input if i.name not in weights]


def _quant_type(value: str, what: str) -> Any:
    require(value in QUANT_TYPES, f"{what} must be one of {QUANT_TYPES}, got {value!r}")
    q = _import("onnxruntime.quantization")
    return q.QuantType.QInt8 if value == "int8" else q.QuantType.QUInt8


def _check_in_out(path_in: object, path_out: object) -> tuple[Path, Path]:
    path_in = _existing(path_in, "path_in")
    path_out = _check_onnx_path(path_out, "path_out")
    require(path_out.resolve() != path_in.resolve(), "path_out must differ from path_in")
    path_out.parent.mkdir(parents=True, exist_ok=True)
    return path_in, path_out


@contextlib.contextmanager
def _preprocessed(path_in: Path, preprocess: bool) -> Iterator[Path]:
    """``path_in`` after ONNX Runtime's ``quant_pre_process`` (symbolic and ONNX shape inference,
    graph optimisation: the quantizer needs every tensor's shape), in a temporary folder.
    ``auto_merge=True`` lets symbolic inference merge dimensions it cannot prove equal (e.g. the
    token axes of a traced BERT, which otherwise stop it with "Incomplete symbolic shape inference").
    It runs inside the temporary folder: when symbolic inference fails, onnxruntime saves
    ``sym_shape_infer_temp.onnx`` and a weights file of the model's size into the working folder."""
    if not preprocess:
        yield path_in
        return
    shape_inference = _import("onnxruntime.quantization.shape_inference")
    source = path_in.resolve()
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / path_in.name
        previous = os.getcwd()
        os.chdir(folder)
        try:
            shape_inference.quant_pre_process(str(source), str(out), auto_merge=True)
        except Exception as err:  # onnxruntime's tools raise bare Exception
            raise ValueError(f"quant_pre_process failed on {path_in.name} ({err}); retry with preprocess=False") from err
        finally:
            os.chdir(previous)
        yield out


def quantize_dynamic(path_in: str | Path, path_out: str | Path, *, weight_type: str = "int8",
                     per_channel: bool = True, preprocess: bool = True) -> Path:
    """Dynamic INT8 quantization with ``onnxruntime.quantization.quantize_dynamic``.

    Weights of MatMul / Gemm / Conv (and embedding Gathers) are stored in 8 bits; activations are
    quantized at run time with each input's own range (``DynamicQuantizeLinear``), so no
    calibration data is needed. MatMul -> ``MatMulInteger``, Conv -> ``ConvInteger``; the latter
    is often slower than fp32 on CPU (see the module docstring): prefer :func:`quantize_static`
    for CNNs.

    Args:
        path_in: the fp32 ".onnx" file; path_out: where to write (a different ".onnx" path).
        weight_type: "int8" (default) or "uint8".
        per_channel: one scale per output channel of each weight (default True; ONNX Runtime's
            own default is False). On all-MiniLM-L6-v2 per-tensor weights moved the sentence
            embeddings to a mean cosine of 0.96 with fp32's, per-channel to 0.99 (measured for
            lesson 09 on 32 corpus sentences); ``reduce_range`` (7-bit) made it worse (0.89).
        preprocess: run ``quant_pre_process`` first (recommended by ONNX Runtime).
    Returns:
        ``path_out``.
    """
    path_in, path_out = _check_in_out(path_in, path_out)
    wtype = _quant_type(weight_type, "weight_type")
    require(isinstance(per_channel, bool) and isinstance(preprocess, bool), "per_channel and preprocess must be True or False")
    q = _import("onnxruntime.quantization")
    with _preprocessed(path_in, preprocess) as source:
        q.quantize_dynamic(str(source), str(path_out), weight_type=wtype, per_channel=per_channel)
    return path_out


def _reader(batches: list[dict[str, np.ndarray]]) -> Any:
    """An ``onnxruntime.quantization.CalibrationDataReader`` over prepared input dicts."""
    q = _import("onnxruntime.quantization")

    class _Batches(q.CalibrationDataReader):
        def __init__(self) -> None:
            self.position = 0

        def get_next(self) -> dict[str, np.ndarray] | None:
            if self.position >= len(batches):
                return None
            self.position += 1
            return batches[self.position - 1]

        def rewind(self) -> None:
            self.position = 0

    return _Batches()


def quantize_static(path_in: str | Path, path_out: str | Path, calibration: Iterable[Mapping[str, Any]], *,
                    activation_type: str = "int8", weight_type: str = "int8", per_channel: bool = True,
                    preprocess: bool = True) -> Path:
    """Static INT8 quantization in QDQ format with MinMax calibration (``onnxruntime.quantization``).

    Every activation range is the min/max seen over the calibration inputs; weights get one scale
    per output channel where the operator allows it (Conv, MatMul with constant weights). The file
    holds QuantizeLinear / DequantizeLinear pairs around each quantized operator; ONNX Runtime
    fuses ``DQ -> Conv -> Q`` into ``QLinearConv`` (and MatMul into ``QLinearMatMul``) when the
    session starts, which is what makes a quantized CNN fast on CPU.

    Args:
        path_in, path_out: as for :func:`quantize_dynamic`.
        calibration: input dicts (name -> tensor or array), each one batch the model takes, e.g.
            ``[{"x": X[i:i + 64]} for i in range(0, 512, 64)]``; read once, checked first.
        activation_type, weight_type: "int8" (default, S8S8: ONNX Runtime's first choice with
            QDQ) or "uint8".
        per_channel: per-output-channel weight scales (default True).
        preprocess: run ``quant_pre_process`` first.
    Returns:
        ``path_out``.
    Raises:
        ValueError: empty calibration, or an input dict whose names differ from the model's.
    """
    path_in, path_out = _check_in_out(path_in, path_out)
    atype, wtype = _quant_type(activation_type, "activation_type"), _quant_type(weight_type, "weight_type")
    require(isinstance(per_channel, bool) and isinstance(preprocess, bool), "per_channel and preprocess must be True or False")
    require(isinstance(calibration, Iterable) and not isinstance(calibration, (Mapping, str)),
            "calibration must be an iterable of input dicts (name -> tensor), not one dict")
    names = _graph_inputs(path_in)
    batches: list[dict[str, np.ndarray]] = []
    for i, item in enumerate(calibration):
        require(isinstance(item, Mapping) and set(item) == set(names),
                f"calibration item {i} must be a dict with exactly the model's inputs {names}, got "
                f"{sorted(item) if isinstance(item, Mapping) else type(item).__name__}")
        for name, value in item.items():
            require(isinstance(value, (torch.Tensor, np.ndarray)),
                    f"calibration item {i}[{name!r}] must be a tensor or array, got {type(value).__name__}")
        batches.append({n: (v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else v) for n, v in item.items()})
    require(len(batches) > 0, "calibration is empty: give at least one input dict")
    q = _import("onnxruntime.quantization")
    with _preprocessed(path_in, preprocess) as source:
        q.quantize_static(str(source), str(path_out), _reader(batches), quant_format=q.QuantFormat.QDQ,
                          activation_type=atype, weight_type=wtype, per_channel=per_channel,
                          calibrate_method=q.CalibrationMethod.MinMax)
    return path_out
