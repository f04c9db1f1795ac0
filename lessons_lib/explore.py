"""Explorers: move a slider instead of re-running a cell, and a printed table where nobody can.

An explorer joins a *callback* to a few *controls*. The callback is a pure function of the
lesson's objects (passed as ``fixed``) and one value per control; it returns one row of named
results, a ``dict`` {column: number or text}. An optional *figure* function takes the same
arguments and returns a matplotlib ``Figure``. :func:`explorer` shows them in one of two ways:

- **live** (a Jupyter front end, ipywidgets installed): one widget per control; every change
  calls the callback again and replaces the row (and the figure) in an ``ipywidgets.Output``.
  The default setting is rendered once at the start.
- **headless** (a script, a terminal, or a notebook executed by papermill, nbclient or nbmake,
  where nobody can move a slider): one table with a row per combination of a few representative
  values of each control, then the figure at the default setting. The executed notebook and the
  course report keep it.

:func:`decide_mode` holds the rule. Like :mod:`lessons_lib.show`, this module displays; the
callbacks of the lessons (second half) only return values and figures.
"""
from __future__ import annotations

import base64
import inspect
import io
import itertools
import math
import numbers
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

from lessons_lib import distill, gptq, measure, precision, prune, quantize, show
from lessons_lib.checks import is_int, require

LIVE, HEADLESS = "live", "headless"
MAX_HEADLESS_ROWS = 64  # beyond this, pass headless_values: a report table should stay readable
_UNSET = object()  # "no default given": the first option is the default


def _check_name(kind: str, name: str) -> None:
    require(isinstance(name, str) and name.isidentifier(),
            f"{kind} name must be a Python identifier (the callback's argument), e.g. 'bits', got {name!r}")


def _is_real(v: object) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


@dataclass(frozen=True)
class Slider:
    """A slider over the numbers ``values`` (increasing; any spacing); ``default`` is one of them
    (None: the first). Representative values when headless: first, middle, default, last."""

    name: str
    values: Sequence[float]
    default: float | None = None

    def __post_init__(self) -> None:
        _check_name("Slider", self.name)
        values = tuple(self.values) if isinstance(self.values, (Sequence, range)) else ()
        require(bool(values) and all(_is_real(v) for v in values),
                f"Slider {self.name!r}: values must be a non-empty sequence of numbers, e.g. [2, 3, 4, 8], got {self.values!r}")
        require(all(a < b for a, b in zip(values, values[1:])), f"Slider {self.name!r}: values must increase, got {values}")
        require(self.default is None or self.default in values, f"Slider {self.name!r}: default {self.default!r} is not one of {values}")
        object.__setattr__(self, "values", values)

    @property
    def options(self) -> tuple:
        return self.values

    @property
    def start(self) -> float:
        return self.values[0] if self.default is None else self.default

    def label(self, value: Any) -> str:
        return f"{value:g}"

    def representatives(self) -> list:
        v = self.values
        return sorted(set([v[0], v[len(v) // 2], self.start, v[-1]]), key=v.index)

    def widget(self, widgets: Any) -> Any:
        return widgets.SelectionSlider(options=[(self.label(v), i) for i, v in enumerate(self.values)],
                                       value=self.values.index(self.start), description=self.name,
                                       continuous_update=False, style={"description_width": "initial"})


@dataclass(frozen=True)
class Choice:
    """A drop-down over ``options`` (any values, None included), shown as ``labels`` (default
    ``str``); ``default`` is one of them (unset: the first). Headless: every option."""

    name: str
    options: Sequence[Any]
    default: Any = _UNSET
    labels: Sequence[str] | None = None

    def __post_init__(self) -> None:
        _check_name("Choice", self.name)
        options = tuple(self.options) if isinstance(self.options, Sequence) and not isinstance(self.options, str) else ()
        require(bool(options), f"Choice {self.name!r}: options must be a non-empty sequence, e.g. ['per_tensor', 'per_channel'], got {self.options!r}")
        require(len({repr(o) for o in options}) == len(options), f"Choice {self.name!r}: options repeat: {options}")
        require(self.default is _UNSET or any(self.default == o for o in options),
                f"Choice {self.name!r}: default {self.default!r} is not one of {options}")
        labels = tuple(str(o) for o in options) if self.labels is None else tuple(self.labels)
        require(len(labels) == len(options), f"Choice {self.name!r}: labels must give one label per option, got {labels}")
        object.__setattr__(self, "options", options)
        object.__setattr__(self, "labels", labels)

    @property
    def start(self) -> Any:
        return self.options[0] if self.default is _UNSET else self.default

    def label(self, value: Any) -> str:
        return next(lab for o, lab in zip(self.options, self.labels) if o == value)

    def representatives(self) -> list:
        return list(self.options)

    def widget(self, widgets: Any) -> Any:
        index = next(i for i, o in enumerate(self.options) if o == self.start)
        return widgets.Dropdown(options=[(lab, i) for i, lab in enumerate(self.labels)], value=index, description=self.name,
                                style={"description_width": "initial"})


@dataclass(frozen=True)
class Number:
    """A box to type any number into (live); headless, the numbers ``samples`` (default: ``default``)."""

    name: str
    default: float
    samples: Sequence[float] = ()

    def __post_init__(self) -> None:
        _check_name("Number", self.name)
        require(_is_real(self.default), f"Number {self.name!r}: default must be a number, e.g. 0.1, got {self.default!r}")
        require(all(_is_real(v) for v in self.samples), f"Number {self.name!r}: samples must be numbers, got {self.samples!r}")
        object.__setattr__(self, "samples", tuple(self.samples))

    @property
    def start(self) -> float:
        return self.default

    def label(self, value: Any) -> str:
        return f"{value:.6g}"

    def representatives(self) -> list:
        return list(self.samples) or [self.default]

    def widget(self, widgets: Any) -> Any:
        return widgets.FloatText(value=self.default, description=self.name, style={"description_width": "initial"})


Control = Slider | Choice | Number


# ----------------------------------------------------------------------------- live or headless
def decide_mode(environ: Mapping[str, str], shell: Any, widgets_available: bool) -> tuple[str, str]:
    """Live or headless, and why. Pure: the caller passes what :func:`current_mode` looks up.

    Rule, first match wins: ``LESSONS_HEADLESS=1`` (or true/yes) -> headless; ipywidgets missing
    -> headless; not inside a Jupyter kernel (``shell`` None, or a terminal IPython without
    ``.kernel``) -> headless; ``LESSONS_HEADLESS=0`` -> live; the cell's ``execute_request`` says
    ``allow_stdin: false`` -> headless; otherwise live. ``allow_stdin`` is the Jupyter messaging
    protocol's flag for "a person can answer ``input()``": JupyterLab, Notebook, VS Code and Colab
    send true; nbclient, and so papermill, nbmake and ``nbconvert --execute``, send false.

    Args:
        environ: environment variables (``os.environ``).
        shell: ``IPython.get_ipython()`` (None outside IPython).
        widgets_available: whether ``import ipywidgets`` works.
    """
    flag = environ.get("LESSONS_HEADLESS", "").strip().lower()
    require(flag in ("", "0", "false", "no", "1", "true", "yes"), f"LESSONS_HEADLESS must be 1 (headless) or 0 (live), got {flag!r}")
    if flag in ("1", "true", "yes"):
        return HEADLESS, "LESSONS_HEADLESS is set"
    if not widgets_available:
        return HEADLESS, "ipywidgets is not installed"
    kernel = getattr(shell, "kernel", None)
    if kernel is None:
        return HEADLESS, "not running in a Jupyter kernel"
    if flag:
        return LIVE, "LESSONS_HEADLESS=0"
    parent = kernel.get_parent() if hasattr(kernel, "get_parent") else getattr(kernel, "_parent_header", {})
    if (parent or {}).get("content", {}).get("allow_stdin") is False:
        return HEADLESS, "executed without a front end (papermill, nbclient, nbmake)"
    return LIVE, "a Jupyter front end"


def _shell() -> Any:
    ipython = sys.modules.get("IPython")  # not imported: not inside IPython
    return ipython.get_ipython() if ipython is not None else None


def current_mode() -> tuple[str, str]:
    """:func:`decide_mode` for this process: ``os.environ``, the running IPython, ipywidgets."""
    try:
        import ipywidgets  # noqa: F401
        available = True
    except ImportError:
        available = False
    return decide_mode(os.environ, _shell(), available)


# ----------------------------------------------------------------------------- one explorer
def _bundle(data: dict[str, str]) -> dict:
    return {"output_type": "display_data", "data": data, "metadata": {}}


@dataclass(frozen=True)
class _Explorer:
    callback: Callable[..., Mapping[str, Any]]
    controls: tuple
    fixed: Mapping[str, Any]
    figure: Callable[..., Any] | None
    float_format: str

    @classmethod
    def build(cls, callback: Callable, controls: Sequence, fixed: Mapping | None, figure: Callable | None,
              float_format: str = ".5g") -> "_Explorer":
        require(callable(callback), f"callback must be a function returning a dict row, got {callback!r}")
        require(figure is None or callable(figure), f"figure must be None or a function returning a Figure, got {figure!r}")
        require(isinstance(controls, Sequence) and len(controls) > 0 and all(isinstance(c, Control) for c in controls),
                f"controls must be a non-empty list of Slider, Choice or Number, got {controls!r}")
        names = [c.name for c in controls]
        require(len(set(names)) == len(names), f"controls: names repeat: {names}")
        fixed = dict(fixed or {})
        require(not set(fixed) & set(names), f"fixed: {sorted(set(fixed) & set(names))} are also controls")
        for fn in filter(None, (callback, figure)):
            try:
                inspect.signature(fn).bind(**fixed, **{n: None for n in names})
            except TypeError as err:
                raise ValueError(f"callback {getattr(fn, '__name__', fn)} cannot take {sorted(fixed) + names}: {err}") from None
        return cls(callback, tuple(controls), fixed, figure, float_format)

    @property
    def defaults(self) -> dict[str, Any]:
        return {c.name: c.start for c in self.controls}

    def row(self, values: Mapping[str, Any]) -> dict[str, Any]:
        result = self.callback(**self.fixed, **values)
        if not isinstance(result, Mapping):
            raise TypeError(f"the callback must return a dict (one table row), got {type(result).__name__}")
        return {**values, **result}

    def cell(self, key: str, value: Any) -> str:
        control = next((c for c in self.controls if c.name == key), None)
        if control is not None:
            return control.label(value)
        return format(value, self.float_format) if isinstance(value, float) else str(value)

    def table(self, rows: list[dict[str, Any]]) -> str:
        header = list(rows[0])
        return show.markdown_table([[self.cell(k, r.get(k, "-")) for k in header] for r in rows],
                                   [k.replace("|", "\\|") for k in header])

    def picture(self, values: Mapping[str, Any]) -> list[dict]:
        if self.figure is None:
            return []
        fig, buffer = self.figure(**self.fixed, **values), io.BytesIO()
        fig.savefig(buffer, format="png", dpi=80)
        if "matplotlib.pyplot" in sys.modules:  # a pyplot figure would be shown again at the end of the cell
            sys.modules["matplotlib.pyplot"].close(fig)
        return [_bundle({"image/png": base64.b64encode(buffer.getvalue()).decode(), "text/plain": "<Figure>"})]

    def render(self, values: Mapping[str, Any]) -> list[dict]:
        """What one setting shows: its row as a one-row table, then its figure."""
        text = self.table([self.row(values)])
        return [_bundle({"text/markdown": text, "text/plain": text})] + self.picture(values)

    def settings(self, headless_values: Mapping[str, Sequence] | None) -> list[dict[str, Any]]:
        """Every combination of each control's representative values (checked, not yet computed)."""
        chosen = dict(headless_values or {})
        require(not set(chosen) - set(self.defaults), f"headless_values names no control: {sorted(set(chosen) - set(self.defaults))}")
        grids = []
        for c in self.controls:
            values = list(dict.fromkeys(chosen.get(c.name, c.representatives())))
            require(bool(values), f"headless_values[{c.name!r}] is empty")
            if not isinstance(c, Number):
                require(all(any(v == o for o in c.options) for v in values), f"headless_values[{c.name!r}] = {values} must come from {c.options}")
            grids.append(values)
        n = math.prod(len(g) for g in grids)
        require(n <= MAX_HEADLESS_ROWS, f"headless_values: {n} combinations, more than {MAX_HEADLESS_ROWS}; give fewer values per control")
        return [dict(zip(self.defaults, combo)) for combo in itertools.product(*grids)]


def headless_rows(callback: Callable, controls: Sequence[Control], fixed: Mapping[str, Any] | None = None,
                  headless_values: Mapping[str, Sequence] | None = None) -> list[dict[str, Any]]:
    """The headless table's rows, {control: value, result column: value}, one per combination of
    each control's representative values (or ``headless_values[name]``), in ``controls`` order."""
    spec = _Explorer.build(callback, controls, fixed, None)
    return [spec.row(values) for values in spec.settings(headless_values)]


def live_widget(callback: Callable, controls: Sequence[Control], fixed: Mapping[str, Any] | None = None,
                figure: Callable | None = None, float_format: str = ".5g") -> Any:
    """The live explorer: an ``ipywidgets.VBox`` of (the controls, an Output showing the current
    row and figure), already rendered at the defaults. Needs no front end to build. An error of the
    callback (a setting it refuses) is shown in the Output instead of the row: a widget callback's
    exception would otherwise only reach the kernel's log."""
    import ipywidgets as widgets

    spec = _Explorer.build(callback, controls, fixed, figure, float_format)
    inputs = {c.name: c.widget(widgets) for c in spec.controls}
    out = widgets.Output()

    def update(change: Any = None) -> None:
        values = {c.name: (inputs[c.name].value if isinstance(c, Number) else c.options[inputs[c.name].value]) for c in spec.controls}
        try:
            out.outputs = tuple(spec.render(values))
        except Exception as err:  # noqa: BLE001  shown to the learner, who can move the slider back
            out.outputs = (_bundle({"text/plain": f"{type(err).__name__}: {err}"}),)

    for w in inputs.values():
        w.observe(update, names="value")
    update()
    return widgets.VBox([widgets.HBox(list(inputs.values())), out])


def _emit(bundles: list[dict]) -> None:
    """Display in a kernel; elsewhere print the text (figures cannot be shown there)."""
    if getattr(_shell(), "kernel", None) is not None:
        from IPython.display import display

        for b in bundles:
            display(b["data"], raw=True)
    else:
        for b in bundles:
            if "image/png" not in b["data"]:
                print(b["data"]["text/plain"])


def explorer(callback: Callable[..., Mapping[str, Any]], controls: Sequence[Control], fixed: Mapping[str, Any] | None = None,
             figure: Callable[..., Any] | None = None, headless_values: Mapping[str, Sequence] | None = None,
             mode: str | None = None, float_format: str = ".5g") -> None:
    """Show ``callback(**fixed, **values)`` live with widgets, or headless as a table.

    Args:
        callback: returns one row, {column: value}, for one value per control.
        controls: :class:`Slider`, :class:`Choice`, :class:`Number`; names are the callback's arguments.
        fixed: the lesson's objects passed to every call (e.g. ``{"W": W}``).
        figure: optional, same arguments as ``callback``, returns a matplotlib Figure (build it
            with ``matplotlib.figure.Figure``, not pyplot: nothing is left open).
        headless_values: name -> values to tabulate headless instead of the representatives.
        mode: "live", "headless", or None to ask :func:`current_mode`.
        float_format: how float results are written, e.g. ".5g".
    """
    require(mode in (None, LIVE, HEADLESS), f"mode must be None (decide automatically), 'live' or 'headless', got {mode!r}")
    mode, why = current_mode() if mode is None else (mode, "chosen by the caller")
    spec = _Explorer.build(callback, controls, fixed, figure, float_format)
    settings = spec.settings(headless_values)  # checked in both modes, computed only headless
    if mode == LIVE:
        from IPython.display import display

        display(live_widget(callback, controls, fixed, figure, float_format))
        return
    table = spec.table([spec.row(values) for values in settings])
    caption = f"Explorer, headless ({why}): one row per setting; in Jupyter, move the controls instead."
    _emit([_bundle({"text/markdown": f"*{caption}*", "text/plain": caption}),
           _bundle({"text/markdown": table, "text/plain": table}), *spec.picture(spec.defaults)])


# ----------------------------------------------------------------------------- the lessons' callbacks
def _figure(width: float = 11, height: float = 3.5, cols: int = 2) -> tuple[Any, Any]:
    """A Figure and its row of ``cols`` axes."""
    from matplotlib.figure import Figure  # not pyplot: no global figure list, no backend needed

    fig = Figure(figsize=(width, height), layout="tight")
    return fig, fig.subplots(1, cols)


def timing_summary(timings: Mapping[str, Sequence[float]], repeats: int) -> dict[str, float]:
    """Lesson 00: median, IQR and mean (ms) of the first ``repeats`` runs of each set of timings,
    e.g. ``{"quiet": steady.times_ms, "busy": busy.times_ms}`` (see :class:`measure.Timing`)."""
    shortest = min(len(t) for t in timings.values())
    require(is_int(repeats) and 1 <= repeats <= shortest, f"repeats must be an int in 1..{shortest}, got {repeats!r}")
    row = {}
    for name, times in timings.items():
        t = measure.Timing(tuple(times[:repeats]))
        row |= {f"{name} median (ms)": t.median_ms, f"{name} IQR (ms)": t.iqr_ms, f"{name} mean (ms)": t.mean_ms}
    return row


def stored_value(value: float, fmt: str) -> dict[str, Any]:
    """Lesson 01: ``value`` stored in a format (:func:`precision.describe_value`)."""
    d = precision.describe_value(value, fmt)
    return {"stored": d["stored"], "bits": d["bits"], "abs error": d["abs_error"], "rel error": d["rel_error"]}


def _weight_config(bits: int, granularity: str, observer: str, group_size: int) -> quantize.QuantConfig:
    return quantize.QuantConfig(bits=bits, granularity=granularity, observer=observer,
                                group_size=group_size if granularity == "per_group" else None)


def weight_quantization(W: torch.Tensor, bits: int, granularity: str, observer: str = "minmax",
                        group_size: int = 64) -> dict[str, Any]:
    """Lesson 02: symmetric quantization of a weight W (out, in, ...) with :mod:`lessons_lib.quantize`
    (Nagel et al., arXiv:2106.08295, sec. 2.2). ``group_size`` counts only for "per_group".

    Returns MSE, SQNR = 10 log10(sum W^2 / sum (W - W_hat)^2) in dB (about 6 dB per bit), the
    largest absolute error, and how many of the 2^bits integer codes the weight lands on.
    """
    cfg = _weight_config(bits, granularity, observer, group_size)
    scale, zero = quantize.compute_qparams(W, cfg)
    q = quantize.quantize(W, scale, zero, cfg)
    err = quantize.dequantize(q, scale, zero, cfg) - W.float()
    sqnr = 10 * math.log10(float(W.float().pow(2).sum()) / max(float(err.pow(2).sum()), 1e-30))
    return {"MSE": float(err.pow(2).mean()), "SQNR (dB)": sqnr, "max abs error": float(err.abs().max()),
            "codes used": f"{q.unique().numel()} of {2**bits}"}


def weight_histogram(W: torch.Tensor, bits: int, granularity: str, observer: str = "minmax", group_size: int = 64) -> Any:
    """Lesson 02: histograms of W and of its quantized values (left), and of the error (right)."""
    W_hat = quantize.fake_quantize(W.detach().float(), _weight_config(bits, granularity, observer, group_size))
    fig, (ax1, ax2) = _figure()
    ax1.hist(W.flatten().float().numpy(), bins=200, log=True, histtype="stepfilled", color="0.6", label="weights")
    ax1.hist(W_hat.flatten().numpy(), bins=200, log=True, histtype="step", color="C3", label="quantized")
    ax1.set(title=f"{bits}-bit {granularity}, {observer}", xlabel="weight value", ylabel="count (log scale)")
    ax1.legend()
    ax2.hist((W_hat - W.float()).flatten().numpy(), bins=200, log=True, histtype="stepfilled", color="C0")
    ax2.set(title="Quantization error", xlabel="W_hat - W", ylabel="count (log scale)")
    return fig


def layer_hessian(model: torch.nn.Module, layer: torch.nn.Module, tokens: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """Lesson 03: H = 2 X^T X / N (in, in) of the inputs X reaching ``layer`` (a Linear inside
    ``model``) while ``model`` reads ``tokens`` (n, T), with :class:`gptq.HessianAccumulator`.
    The model's own weights are used throughout (not GPTQ's block-by-block quantized inputs)."""
    acc = gptq.HessianAccumulator(layer.in_features)
    handle = layer.register_forward_hook(lambda mod, inp, out: acc.add(inp[0].detach().cpu()))
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for batch in tokens.split(batch_size):  # (b, T)
                model(batch.to(device))
    finally:
        handle.remove()
    return acc.H


def gptq_vs_rtn(W: torch.Tensor, H: torch.Tensor, bits: int, group_size: int | None, act_order: bool = False,
                group_rule: str = "reference") -> dict[str, float]:
    """Lesson 03: RTN and GPTQ (:mod:`lessons_lib.gptq`; Frantar et al., arXiv:2210.17323) on one
    layer W (rows, cols) with the Hessian H (cols, cols) of its inputs: weight against output error.

    The output error is the layer's objective, relative: tr(D H D^T) / tr(W H W^T) with D = W - Q,
    i.e. ||(W - Q) X||^2 / ||W X||^2 on the calibration inputs. GPTQ has the larger weight error
    and the smaller output error: it moves weights to cancel each other's errors. ``group_rule``:
    :class:`gptq.GPTQConfig`'s (where a group's scale comes from).
    """
    cfg = gptq.GPTQConfig(bits=bits, group_size=group_size, act_order=act_order, group_rule=group_rule)
    W64, H64 = W.detach().double(), H.double()
    energy = float(torch.einsum("ij,jk,ik->", W64, H64, W64))  # tr(W H W^T)
    row = {}
    for name, qw in (("RTN", gptq.rtn(W, cfg)), ("GPTQ", gptq.gptq(W, H, cfg))):
        D = W64 - qw.dequantize().double()  # (rows, cols)
        row[f"{name} weight MSE"] = float(D.pow(2).mean())
        row[f"{name} output error"] = float(torch.einsum("ij,jk,ik->", D, H64, D)) / energy
    row["GPTQ / RTN output error"] = row["GPTQ output error"] / row["RTN output error"]
    return row


def _staircase(bits: int, max_abs: float, narrow_range: bool, x: torch.Tensor | None) -> tuple:
    """(x, x_hat, d x_hat / d x by the STE, scale, levels) of a symmetric per-tensor quantizer."""
    cfg = quantize.QuantConfig(bits=bits, symmetric=True, granularity="per_tensor", narrow_range=narrow_range)
    require(max_abs > 0, f"max_abs must be > 0 (the range is [-max_abs, max_abs]), got {max_abs!r}")
    scale, zero = quantize.qparams_from_range(torch.tensor(-float(max_abs)), torch.tensor(float(max_abs)), cfg)
    x = (torch.linspace(-2, 2, 801) if x is None else x.detach().float()).clone().requires_grad_()
    x_hat = quantize.fake_quantize(x, cfg, scale, zero)
    x_hat.sum().backward()  # x.grad: the straight-through estimate of d x_hat / d x
    return x.detach(), x_hat.detach(), x.grad, scale, cfg.qmax - cfg.qmin + 1


def fake_quant_staircase(bits: int, max_abs: float, narrow_range: bool = False, x: torch.Tensor | None = None) -> dict[str, Any]:
    """Lesson 04: fake quantization of ``x`` (default 801 points in [-2, 2]) on a symmetric grid
    over [-max_abs, max_abs] (all 2^bits codes, or 2^bits - 1 with ``narrow_range``), and its
    straight-through gradient: 1 inside the range, 0 where clipped (Bengio et al., arXiv:1308.3432)."""
    x, x_hat, grad, scale, levels = _staircase(bits, max_abs, narrow_range, x)
    inside = grad == 1
    err = (x_hat - x).abs()
    return {"levels": levels, "step": float(scale),
            "gradient 1 for x in": f"[{float(x[inside].min()):.4g}, {float(x[inside].max()):.4g}]" if inside.any() else "nowhere",
            "max abs error, gradient 1": float(err[inside].max()) if inside.any() else 0.0,
            "max abs error, clipped": float(err[~inside].max()) if (~inside).any() else 0.0}


def staircase_figure(bits: int, max_abs: float, narrow_range: bool = False, x: torch.Tensor | None = None) -> Any:
    """Lesson 04: the staircase x -> x_hat (left) and the gradient the STE uses (right)."""
    x, x_hat, grad, _, levels = _staircase(bits, max_abs, narrow_range, x)
    fig, (ax1, ax2) = _figure()
    ax1.plot(x, x, "k:", label="identity")
    ax1.plot(x, x_hat, label="fake-quantized")
    ax1.set(title=f"{bits} bits, {levels} levels, range +-{max_abs:g}", xlabel="input x", ylabel="output x_hat")
    ax2.plot(x, grad, label="straight-through estimate")
    ax2.set(title="Gradient in the backward pass", xlabel="input x", ylabel="d x_hat / d x", ylim=(-0.1, 1.2))
    ax1.legend(loc="upper left")
    ax2.legend(loc="upper left")
    return fig


def soft_labels(logits: torch.Tensor, temperature: float) -> dict[str, Any]:
    """Lesson 05: the soft labels p = softmax(logits / T) of one example, logits (C,) (Hinton et
    al., arXiv:1503.02531, sec. 2): the top two classes (never reordered by T), the entropy (nats;
    log C when uniform), and T^2 KL(p || uniform), the soft term :func:`distill.soft_loss` gives an
    undecided student: KL alone vanishes as T grows, the T^2 factor keeps it of the same size."""
    z = logits.detach().float().flatten()  # (C,)
    p = torch.softmax(z / temperature, dim=-1)
    top = p.topk(2)
    kl = distill.soft_loss(torch.zeros(1, len(z)), z[None], temperature)
    return {"top class": int(top.indices[0]), "top p": float(top.values[0]), "runner-up": int(top.indices[1]),
            "runner-up p": float(top.values[1]), "entropy (nats)": float(torch.special.entr(p).sum()),
            "T^2 KL to uniform": float(kl)}


def soft_labels_figure(logits: torch.Tensor, temperature: float) -> Any:
    """Lesson 05: the distribution at T next to the plain softmax (T = 1), log scale."""
    z = logits.detach().float().flatten()
    fig, ax = _figure(8, 3.5, 1)
    classes = torch.arange(len(z)).numpy()
    ax.bar(classes - 0.2, torch.softmax(z, -1).numpy(), 0.4, color="0.6", label="T = 1")
    ax.bar(classes + 0.2, torch.softmax(z / temperature, -1).numpy(), 0.4, color="C0", label=f"T = {temperature:g}")
    ax.set(title="Soft labels of one example", xlabel="class", ylabel="probability (log scale)", yscale="log",
           ylim=(1e-6, 1.5), xticks=classes)
    ax.legend()
    return fig


def criterion_masks(score_sets: Mapping[str, Mapping[str, torch.Tensor]], criterion: str, sparsity: float) -> dict[str, Any]:
    """Lesson 07: prune with one global threshold on ``score_sets[criterion]`` (element scores, name ->
    tensor) at ``sparsity``: each tensor's sparsity (``prune.mask_summary``), and the share of the
    weights kept by "l1" (magnitude) that this criterion keeps too (1.0: the same mask as magnitude)."""
    require(criterion in score_sets, f"criterion must be one of {list(score_sets)}, got {criterion!r}")
    row = {k: v for k, v in prune.mask_summary(score_sets[criterion], sparsity, "global").items() if "lowest" not in k}
    if "l1" in score_sets:
        mine, magnitude = prune.global_masks(score_sets[criterion], sparsity), prune.global_masks(score_sets["l1"], sparsity)
        both = sum(int((mine[n] & magnitude[n]).sum()) for n in mine)
        kept = sum(int(magnitude[n].sum()) for n in magnitude)
        row["kept as by magnitude"] = both / kept if kept else math.nan
    return row


def criterion_masks_figure(score_sets: Mapping[str, Mapping[str, torch.Tensor]], criterion: str, sparsity: float) -> Any:
    """Lesson 07: lesson 06's mask figure for ``score_sets[criterion]`` (global threshold)."""
    require(criterion in score_sets, f"criterion must be one of {list(score_sets)}, got {criterion!r}")
    return prune.mask_figure(score_sets[criterion], sparsity, "global")


def skip_share(ratios: Mapping[int, torch.Tensor], beta: float) -> dict[str, Any]:
    """Lesson 08: dynamic skipping (Lu et al., arXiv:2402.14800, sec. 3.2) skips a token's second
    expert when w2 < beta * w1. From each MoE layer's calibration ratios w2 / w1 (layer -> (N,)),
    the share of second-expert calls skipped per layer and overall, and the expert evaluations left
    per token and layer (2 without skipping)."""
    require(isinstance(ratios, Mapping) and len(ratios) > 0, "ratios must be a non-empty dict layer -> w2/w1 ratios")
    require(_is_real(beta) and 0 <= beta <= 1, f"beta must be a number in [0, 1], got {beta!r}")
    row: dict[str, Any] = {f"layer {layer}": float((r < beta).float().mean()) for layer, r in ratios.items()}
    total = sum(int((r < beta).sum()) for r in ratios.values()) / sum(r.numel() for r in ratios.values())
    row["all layers"] = total
    row["experts per token"] = 2 - total
    return row


def skip_share_figure(ratios: Mapping[int, torch.Tensor], beta: float) -> Any:
    """Lesson 08: the distribution of w2 / w1 per MoE layer, with the threshold beta."""
    fig, ax = _figure(8, 3.5, 1)
    for layer, r in ratios.items():
        ax.hist(r.float().numpy(), bins=40, range=(0, 1), histtype="step", label=f"layer {layer}")
    ax.axvline(beta, color="k", linestyle="--", label=f"beta = {beta:g}: skipped to the left")
    ax.set(title="Second over first routing weight, per token", xlabel="w2 / w1", ylabel="tokens")
    ax.legend(fontsize=8)
    return fig


def pick_configuration(table: Sequence[Mapping[str, Any]], size_budget: float, ppl_tolerance: float,
                       hardware: Sequence[str] | None = None) -> dict[str, Any]:
    """Lesson 09: the cheapest measured configuration (lowest latency) whose bytes are at most
    ``size_budget`` x the fp32 row's and whose perplexity is at most ``ppl_tolerance`` above the fp32
    row's (a fraction), on this machine's ``hardware`` features (``gate.pick``); when none fits, the
    closest one and how it misses, in words."""
    from lessons_lib import gate

    require(_is_real(size_budget) and size_budget > 0, f"size_budget must be a number > 0 (a fraction of fp32's bytes), got {size_budget!r}")
    fp32 = next((r for r in table if r.get("name") == "fp32"), None)
    require(fp32 is not None, "table must hold a row named 'fp32' (the baseline)")
    result = gate.pick(table, quality_key="ppl", cost_key="ms", higher_is_better=False, max_bytes=size_budget * float(fp32["bytes"]),
                       max_quality_loss=ppl_tolerance, relative=True, hardware=hardware)
    if result.found:
        row = result.chosen
        return {"choice": row["name"], "bytes / fp32": float(row["bytes"]) / float(fp32["bytes"]),
                "perplexity change": float(row["ppl"]) / float(fp32["ppl"]) - 1, "ms": float(row["ms"]), "why not the others": len(result.rejected)}
    return {"choice": f"none fits; closest: {result.closest}", "bytes / fp32": math.nan, "perplexity change": math.nan, "ms": math.nan,
            "why not the others": result.miss}
