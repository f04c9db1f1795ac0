"""The course report: metric labels, widgets made static, and index.html of a real run that a
browser can show offline (formulas from the run folder's MathJax, plots inline)."""
import json
import re

import nbformat
import pytest

from lessons_lib import report, runner

PARAMS = 'quick = True  # fast\ndevice = "auto"  # where\nseed = 0  # seed\nresults_dir = "../results"  # out\n'
FORMULA = r"GPTQ keeps $\|WX - \hat W X\|_2^2$ small:" + "\n\n" + r"$$\delta = -\frac{w_q - q}{[H^{-1}]_{qq}}$$"
PLOT = ("import matplotlib.pyplot as plt\n"
        "plt.plot([1, 2, 3], [1, 4, 9]); plt.title('squares'); plt.xlabel('x'); plt.ylabel('x squared')\n"
        "plt.show()")
RECORD = ("from lessons_lib import results\n"
          "results.record('00_formula', {'fp32_acc': 0.912, 'minilm_int8_ms': 1.25, 'fp32_weight_bytes': 1234567},"
          " parameters={}, results_dir=results_dir, device='cpu', quick=quick)")
# What a page would need from the network to display: scripts, styles, frames, images, imports.
NETWORK = re.compile(r"""<(script|link|img|iframe)\b[^>]*\b(src|href)\s*=\s*["']?(https?:)?//"""
                     r"""|@import\s+url\(\s*["']?(https?:)?//|\bimport\(\s*["'](https?:)?//""", re.I)


def _lesson(path, title, cells):
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell(PARAMS)
    params.metadata["tags"] = ["parameters"]
    nb.cells = [nbformat.v4.new_markdown_cell(f"# {title}"), params, *cells]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """One real run: a lesson with a formula, a plot and metrics; one that fails half way."""
    root = tmp_path_factory.mktemp("course")
    nbs = root / "notebooks"
    nbs.mkdir()
    md, code = nbformat.v4.new_markdown_cell, nbformat.v4.new_code_cell
    _lesson(nbs / "00_formula.ipynb", "Formula", [md(FORMULA), code(PLOT), code(RECORD)])
    _lesson(nbs / "01_broken.ipynb", "Broken", [code("print('half way there')"), code("raise RuntimeError('on purpose')")])
    code_ = runner.main(["run", "--notebooks", str(nbs), "--runs-dir", str(root / "runs")])
    assert code_ == 1  # the broken lesson
    (run,) = (root / "runs").iterdir()
    return run


def test_index_links_every_lesson_page_with_status_time_memory_and_metrics(run_dir):
    index = (run_dir / "index.html").read_text()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["report"] == "index.html"
    for stem in ("00_formula", "01_broken"):
        assert f'<a href="{stem}.html">{stem}</a>' in index
        assert (run_dir / f"{stem}.html").is_file()
        rss = summary["lessons"][stem]["peak_rss_mb"]
        assert rss > 10 and f"{rss:,.0f}" in index  # a Python kernel is tens of MB at least
    assert '<td class="ok">OK</td>' in index and '<td class="failed">FAILED</td>' in index
    assert "RuntimeError: on purpose" in index
    # Readable label, value, unit, and the raw name for each metric.
    assert "<td>FP32 accuracy</td>" in index and "<code>fp32_acc</code>" in index
    assert "<td>MiniLM INT8 time</td>" in index and "ms (milliseconds)" in index
    assert "1,234,567 (1.23 MB)" in index
    assert "Every lesson stayed under Binder" in index
    assert "<th>cpu_count</th>" in index and "<th>torch</th>" in index  # the machine


def test_failed_lesson_gets_its_partial_page(run_dir):
    page = (run_dir / "01_broken.html").read_text()
    assert "half way there" in page and "on purpose" in page


def test_pages_need_no_network_and_typeset_math_from_the_run_folder(run_dir):
    page = (run_dir / "00_formula.html").read_text()
    for html in (page, (run_dir / "index.html").read_text(), (run_dir / "01_broken.html").read_text()):
        assert not NETWORK.search(html), NETWORK.search(html).group(0)
    assert '<script src="mathjax/MathJax.js?config=TeX-AMS-MML_HTMLorMML-full,Safe">' in page
    assert 'webFont: "STIX-Web"' in page  # the only fonts the local copy has
    mathjax = run_dir / "mathjax"
    for needed in ("MathJax.js", "config/TeX-AMS-MML_HTMLorMML-full.js", "jax/output/HTML-CSS/fonts/STIX-Web/fontdata.js",
                   "jax/input/TeX/config.js", "extensions/Safe.js", "LICENSE"):
        assert (mathjax / needed).is_file(), needed
    assert list((mathjax / "fonts/HTML-CSS/STIX-Web/woff").rglob("*.woff"))
    assert r"\hat W X\|_2^2" in page and r"\frac{w_q - q}" in page  # left for MathJax to typeset
    assert re.search(r'<img [^>]*src="data:image/png;base64,', page)  # the plot, inline


@pytest.mark.parametrize(
    "name,label,unit",
    [
        ("minilm_int8_ms", "MiniLM INT8 time", "ms (milliseconds)"),
        ("cpu_ms_bf16", "CPU time BF16", "ms (milliseconds)"),
        ("fp32_acc", "FP32 accuracy", "fraction correct (0-1)"),
        ("ppl_gptq_w4", "Perplexity GPTQ W4", "perplexity"),
        ("lm_fp16_weight_bytes", "LM FP16 weight size", "bytes"),
        ("gptq_seconds", "GPTQ time", "s (seconds)"),
        ("weight_sqnr_per_channel_db", "Weight SQNR per channel", "dB (decibels)"),
        ("kd_minus_alone_p", "KD minus alone p-value", "probability (0-1)"),
        ("busy_over_quiet_median", "Busy over quiet median", ""),
        ("p", "P", ""),  # a one-part name is not a statistic of something
    ],
)
def test_metric_labels_and_units_follow_the_naming_conventions(name, label, unit):
    assert report.describe_metric(name) == (label, unit)


def test_format_value():
    assert report.format_value("fp32_weight_bytes", 1234567) == "1,234,567 (1.23 MB)"
    assert report.format_value("packed_w4_scale_bytes", 512) == "512"
    assert report.format_value("fp32_acc", 0.912345678) == "0.9123"
    assert report.format_value("fp16_overflow_module", "fc2") == "fc2"
    assert report.format_value("flag", True) == "True"


def test_widget_output_becomes_its_controls_and_captured_output():
    nb = nbformat.v4.new_notebook()
    view = {"model_id": "box", "version_major": 2, "version_minor": 0}
    cell = nbformat.v4.new_code_cell("interact(...)")
    cell.outputs = [nbformat.v4.new_output("display_data", data={
        "application/vnd.jupyter.widget-view+json": view, "text/plain": "interactive(...)"})]
    nb.cells = [cell, nbformat.v4.new_markdown_cell("text")]
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {
        "box": {"model_name": "VBoxModel", "state": {"children": ["IPY_MODEL_bits", "IPY_MODEL_fmt", "IPY_MODEL_out"]}},
        "bits": {"model_name": "IntSliderModel", "state": {"description": "bits", "value": 4}},
        "fmt": {"model_name": "DropdownModel", "state": {"description": "fmt", "index": 1, "_options_labels": ["fp16", "bf16"]}},
        "out": {"model_name": "OutputModel", "state": {"outputs": [
            {"output_type": "stream", "name": "stdout", "text": "error 0.12\n"}]}},
    }}}
    assert report.static_widgets(nb) == 1
    note, captured = nb.cells[0].outputs
    assert "(bits = 4, fmt = &#x27;bf16&#x27;)" in note["data"]["text/html"]
    assert captured["text"] == "error 0.12\n"
    assert "widgets" not in nb.metadata
    nbformat.validate(nb)


def _summary(**lesson):
    base = {"status": "ok", "seconds": 3.0, "error": None, "notebook": "00_a.ipynb", "peak_rss_mb": 100.0,
            "title": "A <b>bold</b> title", "parameters": {}, "device": "cpu", "metrics": {"fp32_acc": 0.5}}
    return {"run": "r", "started": "t", "seconds": 3.0, "full": False, "overrides": {}, "machine": {"python": "3"},
            "memory_limit_mb": 2147.5, "rss_sample_interval_s": 0.1, "over_memory_limit": ["00_a"],
            "lessons": {"00_a": base | lesson}}


def test_index_flags_memory_escapes_text_and_says_when_math_needs_internet(tmp_path):
    summary = _summary(peak_rss_mb=3000.0)
    page = report.index_html(summary, report.Report(index=tmp_path / "index.html"))
    assert "Over Binder's memory limit" in page and "00_a (3,000 MB)" in page
    assert "A &lt;b&gt;bold&lt;/b&gt; title" in page
    assert "from the internet" in page  # no local MathJax was copied
    assert '<a href="00_a.html">' not in page  # no page was rendered: no dead link


def test_report_without_local_mathjax_or_notebook_still_writes_the_index(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "mathjax_source", lambda: None)
    written = report.write_report(tmp_path, _summary())
    assert written.mathjax_url is None and not (tmp_path / "mathjax").exists()
    assert "no executed notebook" in written.problems["00_a"]
    assert "no executed notebook" in written.index.read_text()
