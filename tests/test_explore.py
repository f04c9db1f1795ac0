"""lessons_lib.explore: the live/headless rule, the two renderings, and each lesson's callback
against an independent computation."""
import base64
import math
import statistics

import nbformat
import numpy as np
import pytest
import torch
from torch import nn

from lessons_lib import explore, gptq, precision, prune

# ----------------------------------------------------------------------------- control specifications


@pytest.mark.parametrize("make, message", [
    (lambda: explore.Slider("bits", []), "Slider 'bits': values must be a non-empty"),
    (lambda: explore.Slider("bits", [4, 2]), "Slider 'bits': values must increase"),
    (lambda: explore.Slider("bits", [2, 4], default=3), "Slider 'bits': default 3 is not one of"),
    (lambda: explore.Slider("bits", ["2", "4"]), "Slider 'bits': values must be a non-empty sequence of numbers"),
    (lambda: explore.Slider("2 bits", [2, 4]), "Slider name must be a Python identifier"),
    (lambda: explore.Choice("granularity", []), "Choice 'granularity': options must be a non-empty"),
    (lambda: explore.Choice("granularity", "per_tensor"), "Choice 'granularity': options must be a non-empty sequence"),
    (lambda: explore.Choice("g", ["a", "a"]), "Choice 'g': options repeat"),
    (lambda: explore.Choice("g", ["a", "b"], default="c"), "Choice 'g': default 'c' is not one of"),
    (lambda: explore.Choice("g", ["a", "b"], labels=["A"]), "Choice 'g': labels must give one label per option"),
    (lambda: explore.Number("value", "0.1"), "Number 'value': default must be a number"),
    (lambda: explore.Number("value", 0.1, samples=[True]), "Number 'value': samples must be numbers"),
])
def test_bad_control_specs_raise_naming_the_control(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def _row(bits, granularity="per_tensor"):
    return {"twice": 2 * bits, "name": granularity.upper()}


BITS = explore.Slider("bits", [2, 3, 4, 6, 8], default=4)
GRAN = explore.Choice("granularity", ["per_tensor", "per_channel"], labels=["tensor", "channel"])


@pytest.mark.parametrize("kwargs, message", [
    (dict(controls=[]), "controls must be a non-empty list"),
    (dict(controls=[{"name": "bits"}]), "controls must be a non-empty list of Slider"),
    (dict(controls=[BITS, explore.Choice("bits", [1])]), r"controls: names repeat: \['bits', 'bits'\]"),
    (dict(controls=[BITS], fixed={"bits": 3}), r"fixed: \['bits'\] are also controls"),
    (dict(controls=[BITS, explore.Choice("observer", ["minmax"])]), "callback _row cannot take"),
    (dict(controls=[BITS], headless_values={"bit": [2]}), r"headless_values names no control: \['bit'\]"),
    (dict(controls=[BITS], headless_values={"bits": [5]}), r"headless_values\['bits'\] = \[5\] must come from"),
    (dict(controls=[BITS], headless_values={"bits": []}), r"headless_values\['bits'\] is empty"),
    (dict(controls=[explore.Slider("bits", range(100))], headless_values={"bits": range(100)}), "headless_values: 100 combinations, more than 64"),
    (dict(controls=[BITS], mode="interactive"), "mode must be None"),
    (dict(controls=[BITS], figure="hist"), "figure must be None or a function"),
])
def test_bad_explorer_arguments_raise_naming_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        explore.explorer(_row, **{"mode": "headless", **kwargs})


def test_a_callback_that_is_not_callable_or_returns_no_dict_is_refused():
    with pytest.raises(ValueError, match="callback must be a function"):
        explore.explorer("row", [BITS], mode="headless")
    with pytest.raises(TypeError, match="must return a dict"):
        explore.explorer(lambda bits: 2 * bits, [BITS], mode="headless")


# ----------------------------------------------------------------------------- live or headless
class _Kernel:
    def __init__(self, allow_stdin):
        self.allow_stdin = allow_stdin

    def get_parent(self):
        return {"content": {"code": "...", "allow_stdin": self.allow_stdin}}


class _Shell:
    def __init__(self, kernel):
        self.kernel = kernel


class _TerminalShell:  # terminal IPython: no kernel
    pass


@pytest.mark.parametrize("environ, shell, widgets, expected", [
    ({}, _Shell(_Kernel(True)), True, ("live", "a Jupyter front end")),
    ({}, _Shell(_Kernel(False)), True, ("headless", "executed without a front end (papermill, nbclient, nbmake)")),
    ({"LESSONS_HEADLESS": "1"}, _Shell(_Kernel(True)), True, ("headless", "LESSONS_HEADLESS is set")),
    ({"LESSONS_HEADLESS": "0"}, _Shell(_Kernel(False)), True, ("live", "LESSONS_HEADLESS=0")),
    ({"LESSONS_HEADLESS": "0"}, None, True, ("headless", "not running in a Jupyter kernel")),
    ({}, _Shell(_Kernel(True)), False, ("headless", "ipywidgets is not installed")),
    ({}, None, True, ("headless", "not running in a Jupyter kernel")),
    ({}, _TerminalShell(), True, ("headless", "not running in a Jupyter kernel")),
    ({}, _Shell(object()), True, ("live", "a Jupyter front end")),  # cannot tell: widgets do no harm
])
def test_decide_mode(environ, shell, widgets, expected):
    assert explore.decide_mode(environ, shell, widgets) == expected


def test_decide_mode_refuses_an_unknown_switch_value():
    with pytest.raises(ValueError, match="LESSONS_HEADLESS must be 1"):
        explore.decide_mode({"LESSONS_HEADLESS": "maybe"}, None, True)


def test_outside_a_kernel_the_automatic_mode_is_headless():
    assert explore.current_mode()[0] == "headless"


def test_in_a_real_kernel_nbclient_executes_headless_and_a_front_end_gets_widgets():
    """End to end in one kernel: nbclient (what papermill and nbmake run) gets the table and the
    figure as outputs; then a request that allows stdin, as JupyterLab's, gets the widgets."""
    from jupyter_core.utils import run_sync
    from nbclient import NotebookClient

    code = ("from lessons_lib import explore\n"
            "explore.explorer(explore.soft_labels, [explore.Slider('temperature', [1.0, 4.0])],\n"
            "                 fixed={'logits': __import__('torch').tensor([3.0, 1.0, 0.0])}, figure=explore.soft_labels_figure)")
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(code)])
    client = NotebookClient(nb, timeout=120, kernel_name="python3")
    live = []
    with client.setup_kernel():
        client.execute_cell(nb.cells[0], 0)
        run_sync(client.kc.execute_interactive)(code, allow_stdin=True, output_hook=live.append,
                                                stdin_hook=lambda msg: None, timeout=120)
    kinds = [mime for out in nb.cells[0].outputs for mime in out.get("data", {})]
    assert "image/png" in kinds and "application/vnd.jupyter.widget-view+json" not in kinds
    tables = [o["data"]["text/markdown"] for o in nb.cells[0].outputs if "| temperature |" in o.get("data", {}).get("text/markdown", "")]
    assert len(tables) == 1 and tables[0].count("\n| ") == 2, "one row per temperature"
    data = [m["content"].get("data", {}) for m in live if m["msg_type"] == "display_data"]
    assert any("application/vnd.jupyter.widget-view+json" in d for d in data), [m["msg_type"] for m in live]
    assert not any("text/markdown" in d for d in data), "live: the table lives in the Output widget, not in the cell"


# ----------------------------------------------------------------------------- headless and live renderings
class _Recorder:
    def __init__(self):
        self.calls = []

    def __call__(self, bits, granularity):
        self.calls.append((bits, granularity))
        return {"twice": 2 * bits, "ratio": bits / 3}


def test_headless_prints_the_representative_rows(capsys):
    record = _Recorder()
    explore.explorer(record, [BITS, GRAN], mode="headless")
    assert record.calls == [(b, g) for b in (2, 4, 8) for g in ("per_tensor", "per_channel")]  # first, middle = default, last
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("Explorer, headless (chosen by the caller)")
    assert lines[1:4] == ["| bits | granularity | twice | ratio |", "|---|---|---|---|", "| 2 | tensor | 4 | 0.66667 |"]
    assert lines[-1] == "| 8 | channel | 16 | 2.6667 |" and len(lines) == 3 + 6


def test_headless_values_choose_the_rows_and_fixed_objects_reach_the_callback(capsys):
    explore.explorer(lambda W, bits: {"sum": W * bits}, [BITS], fixed={"W": 10}, headless_values={"bits": [3, 3, 6]}, mode="headless")
    assert capsys.readouterr().out.splitlines()[3:] == ["| 3 | 30 |", "| 6 | 60 |"]
    rows = explore.headless_rows(lambda W, bits: {"sum": W * bits}, [BITS], fixed={"W": 1}, headless_values={"bits": [8]})
    assert rows == [{"bits": 8, "sum": 8}]


def test_slider_and_number_representatives():
    assert explore.Slider("n", range(1, 31), default=30).representatives() == [1, 16, 30]
    assert explore.Slider("t", [0.5, 1, 2, 4, 8, 16], default=1).representatives() == [0.5, 1, 4, 16]
    assert explore.Number("value", 0.1).representatives() == [0.1]
    assert explore.Number("value", 0.1, samples=(1e-8, 7e4)).representatives() == [1e-8, 7e4]


def _png(bundles):
    return [base64.b64decode(b["data"]["image/png"]) for b in bundles if "image/png" in b["data"]]


def test_headless_draws_the_figure_once_at_the_defaults(capsys):
    calls = []

    def figure(bits, granularity):
        from matplotlib.figure import Figure
        calls.append((bits, granularity))
        return Figure()

    explore.explorer(_Recorder(), [BITS, GRAN], figure=figure, mode="headless")
    assert calls == [(4, "per_tensor")]
    assert "<Figure>" not in capsys.readouterr().out, "outside a kernel a figure cannot be shown, and is not printed"


def test_live_widget_renders_the_defaults_and_rerenders_on_every_change():
    import ipywidgets as widgets
    from matplotlib.figure import Figure

    record = _Recorder()
    value = explore.Number("offset", 0.5)
    box = explore.live_widget(lambda bits, granularity, offset: {**record(bits, granularity), "offset+1": offset + 1},
                              [BITS, GRAN, value], figure=lambda bits, granularity, offset: Figure())
    slider, dropdown, text = box.children[0].children
    out = box.children[1]
    assert isinstance(slider, widgets.SelectionSlider) and isinstance(dropdown, widgets.Dropdown) and isinstance(text, widgets.FloatText)
    assert [label for label, _ in slider.options] == ["2", "3", "4", "6", "8"] and slider.label == "4"
    assert [label for label, _ in dropdown.options] == ["tensor", "channel"]
    assert isinstance(out, widgets.Output) and record.calls == [(4, "per_tensor")]
    assert out.outputs[0]["data"]["text/markdown"].splitlines()[-1] == "| 4 | tensor | 0.5 | 8 | 1.3333 | 1.5 |"
    assert _png(out.outputs)[0].startswith(b"\x89PNG")
    slider.value = 0  # the learner moves the slider to 2 bits
    dropdown.value = 1
    text.value = 2.0
    assert record.calls[-1] == (2, "per_channel")
    assert out.outputs[0]["data"]["text/markdown"].splitlines()[-1] == "| 2 | channel | 2 | 4 | 0.66667 | 3 |"


def test_live_shows_a_refused_setting_instead_of_failing():
    def picky(bits):
        if bits == 2:
            raise ValueError("2 bits is not supported here")
        return {"ok": True}

    box = explore.live_widget(picky, [BITS])
    box.children[0].children[0].value = 0
    assert box.children[1].outputs[0]["data"]["text/plain"] == "ValueError: 2 bits is not supported here"


def test_live_mode_computes_only_the_default_setting(capsys):
    record = _Recorder()
    explore.explorer(record, [BITS, GRAN], mode="live")  # no front end here: the box's repr is printed
    assert record.calls == [(4, "per_tensor")]
    assert "VBox" in capsys.readouterr().out


# ----------------------------------------------------------------------------- lesson callbacks
def test_timing_summary_is_the_median_iqr_and_mean_of_the_first_runs():
    quiet, busy = [5.0, 1.0, 2.0, 9.0, 3.0, 4.0], [7.0, 8.0, 6.0, 50.0, 7.5, 6.5]
    row = explore.timing_summary({"quiet": quiet, "busy": busy}, 4)
    q1, q3 = np.percentile(quiet[:4], [25, 75])  # inclusive quartiles, as measure.Timing
    assert row["quiet median (ms)"] == statistics.median([5.0, 1.0, 2.0, 9.0]) == 3.5
    assert row["quiet IQR (ms)"] == pytest.approx(q3 - q1)
    assert row["busy mean (ms)"] == pytest.approx(71.0 / 4) and row["busy median (ms)"] == 7.5
    assert explore.timing_summary({"quiet": quiet}, 1)["quiet IQR (ms)"] == 0.0
    with pytest.raises(ValueError, match=r"repeats must be an int in 1..6"):
        explore.timing_summary({"quiet": quiet, "busy": busy}, 7)


def test_stored_value_is_what_the_format_keeps():
    row = explore.stored_value(0.1, "bf16")
    assert row["stored"] == float(torch.tensor(0.1, dtype=torch.float64).bfloat16()) == 0.10009765625
    assert row["bits"] == precision.bit_string(0.1, "bf16") and row["abs error"] == pytest.approx(0.10009765625 - 0.1)
    assert math.isinf(explore.stored_value(70000.0, "fp16")["stored"])
    assert explore.stored_value(1000.5, "int8")["stored"] == 127.0


def _weight(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16, 64, generator=g) * torch.logspace(-2, 0, 16)[:, None]  # rows of very different ranges


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_weight_quantization_equals_a_manual_symmetric_quantizer(bits):
    W = _weight()
    s = W.abs().max() / ((2**bits - 1) / 2)  # per tensor, all 2^bits codes
    q = torch.clamp(torch.round(W / s), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    err = q * s - W
    row = explore.weight_quantization(W, bits, "per_tensor")
    assert row["MSE"] == pytest.approx(float(err.pow(2).mean()), rel=1e-5)
    assert row["SQNR (dB)"] == pytest.approx(10 * math.log10(float(W.pow(2).sum() / err.pow(2).sum())), rel=1e-5)
    assert row["max abs error"] == pytest.approx(float(err.abs().max()), rel=1e-5)
    assert row["codes used"] == f"{q.unique().numel()} of {2**bits}"


def test_weight_quantization_per_channel_beats_per_tensor_and_gains_about_6_db_per_bit():
    W = _weight()
    per_tensor, per_channel = (explore.weight_quantization(W, 4, g)["SQNR (dB)"] for g in ("per_tensor", "per_channel"))
    assert per_channel > per_tensor + 3, "rows with small ranges get their own fine grid"
    gain = explore.weight_quantization(W, 8, "per_channel")["SQNR (dB)"] - explore.weight_quantization(W, 7, "per_channel")["SQNR (dB)"]
    assert 5 < gain < 7
    assert explore.weight_quantization(W, 4, "per_group", group_size=16)["SQNR (dB)"] >= per_channel


def test_the_figures_are_figures_that_pyplot_does_not_keep():
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure

    before = plt.get_fignums()
    figures = [explore.weight_histogram(_weight(), 3, "per_channel"), explore.staircase_figure(3, 1.0),
               explore.soft_labels_figure(torch.tensor([2.0, 0.0, -1.0]), 2.0)]
    assert all(isinstance(f, Figure) for f in figures) and [len(f.axes) for f in figures] == [2, 2, 1]
    assert plt.get_fignums() == before


def test_layer_hessian_is_2_xtx_over_n_of_the_layers_inputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(50, 8), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
    tokens = torch.randint(0, 50, (5, 7))  # (n, T)
    X = model[1](model[0](tokens)).relu().reshape(-1, 6).detach()  # (35, 6): what reaches the last Linear
    H = explore.layer_hessian(model, model[3], tokens, batch_size=2)
    torch.testing.assert_close(H, 2 * X.T @ X / len(X))
    assert not model[3]._forward_hooks, "the hook is removed"


def test_gptq_vs_rtn_output_error_is_the_relative_error_on_the_inputs():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(2000, 32, generator=g) @ torch.randn(32, 32, generator=g)  # (N, in), correlated inputs
    W = torch.randn(8, 32, generator=g)
    H = 2 * X.T @ X / len(X)
    row = explore.gptq_vs_rtn(W, H, 3, None)
    cfg = gptq.GPTQConfig(bits=3)
    for name, Q in (("RTN", gptq.rtn(W, cfg).dequantize()), ("GPTQ", gptq.gptq(W, H, cfg).dequantize())):
        by_hand = float(((X @ (W - Q).T) ** 2).sum() / ((X @ W.T) ** 2).sum())
        assert row[f"{name} output error"] == pytest.approx(by_hand, rel=1e-4)
        assert row[f"{name} weight MSE"] == pytest.approx(float((W - Q).pow(2).mean()), rel=1e-5)
    assert row["GPTQ output error"] < row["RTN output error"] and row["GPTQ / RTN output error"] < 1
    assert explore.gptq_vs_rtn(W, H, 3, 8)["RTN output error"] < row["RTN output error"], "groups help RTN"
    with pytest.raises(ValueError, match="group_size=5 must divide"):
        explore.gptq_vs_rtn(W, H, 3, 5)
    for rule in gptq.GROUP_RULES:  # the rule reaches GPTQ (RTN has no updates, so no rule)
        cfg = gptq.GPTQConfig(bits=3, group_size=8, group_rule=rule)  # groups 2-4 start inside the first block of 128
        Q = gptq.gptq(W, H, cfg).dequantize()
        by_hand = float(((X @ (W - Q).T) ** 2).sum() / ((X @ W.T) ** 2).sum())
        assert explore.gptq_vs_rtn(W, H, 3, 8, group_rule=rule)["GPTQ output error"] == pytest.approx(by_hand, rel=1e-4)


@pytest.mark.parametrize("bits, narrow", [(3, False), (2, True), (8, False)])
def test_fake_quant_staircase_matches_the_hand_quantizer_and_torch(bits, narrow):
    x = torch.linspace(-2, 2, 801)
    qmin, qmax = (-(2 ** (bits - 1)) + narrow, 2 ** (bits - 1) - 1)
    s = 1.0 / ((qmax - qmin) / 2)  # range [-1, 1]
    codes = torch.round(x / s)
    x_hat = codes.clamp(qmin, qmax) * s
    inside = (codes >= qmin) & (codes <= qmax)
    row = explore.fake_quant_staircase(bits, 1.0, narrow, x=x)
    assert row["levels"] == qmax - qmin + 1 and row["step"] == pytest.approx(s)
    assert row["gradient 1 for x in"] == f"[{float(x[inside].min()):.4g}, {float(x[inside].max()):.4g}]"
    assert row["max abs error, gradient 1"] == pytest.approx(float((x_hat - x)[inside].abs().max()), abs=1e-6)
    assert row["max abs error, gradient 1"] <= s / 2 + 1e-6, "inside the range, at most half a step"
    xr = x.clone().requires_grad_()
    theirs = torch.fake_quantize_per_tensor_affine(xr, s, 0, qmin, qmax)
    theirs.sum().backward()
    x_, ours, grad, _, _ = explore._staircase(bits, 1.0, narrow, x)
    torch.testing.assert_close(ours, theirs.detach())
    torch.testing.assert_close(grad, xr.grad)
    torch.testing.assert_close(grad, inside.float())


def test_soft_labels_is_the_softmax_at_t_and_flattens_as_t_grows():
    z = torch.tensor([6.0, 1.0, 3.5, -2.0, 0.0, 0.5, -1.0, 2.0, 4.0, -3.0])  # 10 classes
    rows = [explore.soft_labels(z, T) for T in (0.5, 1.0, 2.0, 4.0, 8.0)]
    for T, row in zip((0.5, 1.0, 2.0, 4.0, 8.0), rows):
        p = torch.softmax(z / T, dim=-1)
        assert row["top class"] == 0 and row["runner-up"] == 8, "the order never changes"
        assert row["top p"] == pytest.approx(float(p[0])) and row["runner-up p"] == pytest.approx(float(p[8]))
        entropy = -sum(float(pi) * math.log(float(pi)) for pi in p if pi > 0)
        assert row["entropy (nats)"] == pytest.approx(entropy, rel=1e-5, abs=1e-7)
        assert row["T^2 KL to uniform"] == pytest.approx(T**2 * (math.log(10) - entropy), rel=1e-4, abs=1e-6)
    entropies = [r["entropy (nats)"] for r in rows]
    assert all(a < b for a, b in zip(entropies, entropies[1:])) and entropies[-1] < math.log(10)


def test_criterion_masks_compares_a_criterion_with_magnitude():
    g = torch.Generator().manual_seed(0)
    w = {"a.weight": torch.randn(8, 4, generator=g), "b.weight": torch.randn(2, 4, generator=g)}
    sets = {"l1": {n: v.abs() for n, v in w.items()}, "l2": {n: v.square() for n, v in w.items()},
            "random": {n: torch.rand(v.shape, generator=g) for n, v in w.items()}}
    same = explore.criterion_masks(sets, "l2", 0.5)
    assert same["kept as by magnitude"] == 1.0 and same["global"] == 0.5
    other = explore.criterion_masks(sets, "random", 0.5)
    mine, magnitude = (prune.global_masks(sets[c], 0.5) for c in ("random", "l1"))
    both = sum(int((mine[n] & magnitude[n]).sum()) for n in w)
    assert other["kept as by magnitude"] == both / 20 and other["a"] == prune.sparsity(mine).fractions["a.weight"]
    assert len(explore.criterion_masks_figure(sets, "random", 0.5).axes) == 2
    with pytest.raises(ValueError, match="criterion must be one of"):
        explore.criterion_masks(sets, "fisher", 0.5)


def test_skip_share_counts_ratios_below_beta():
    ratios = {0: torch.tensor([0.1, 0.5, 0.9, 1.0]), 2: torch.tensor([0.2, 0.3])}
    row = explore.skip_share(ratios, 0.4)
    assert row["layer 0"] == 0.25 and row["layer 2"] == 1.0
    assert row["all layers"] == pytest.approx(3 / 6) and row["experts per token"] == pytest.approx(1.5)
    assert explore.skip_share(ratios, 0.0)["all layers"] == 0.0 and explore.skip_share(ratios, 1.0)["all layers"] == pytest.approx(5 / 6)
    assert len(explore.skip_share_figure(ratios, 0.4).axes) == 1
    with pytest.raises(ValueError, match="beta must be"):
        explore.skip_share(ratios, 1.5)


def test_pick_configuration_takes_the_fastest_row_that_fits():
    table = [{"name": "fp32", "ppl": 10.0, "bytes": 100, "ms": 10.0}, {"name": "int8", "ppl": 10.2, "bytes": 30, "ms": 6.0},
             {"name": "w4", "ppl": 11.5, "bytes": 15, "ms": 8.0}, {"name": "fast", "ppl": 10.1, "bytes": 90, "ms": 1.0, "needs": ["cuda"]}]
    assert explore.pick_configuration(table, 0.5, 0.05, hardware=["cpu"])["choice"] == "int8"
    assert explore.pick_configuration(table, 1.0, 0.05, hardware=["cpu", "cuda"])["choice"] == "fast"
    assert explore.pick_configuration(table, 0.2, 0.2, hardware=["cpu"])["choice"] == "w4"
    none = explore.pick_configuration(table, 0.2, 0.05, hardware=["cpu"])
    assert none["choice"].startswith("none fits; closest:") and math.isnan(none["ms"])
    with pytest.raises(ValueError, match="size_budget"):
        explore.pick_configuration(table, 0, 0.05)
