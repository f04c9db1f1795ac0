"""The course report: a run folder's executed notebooks as web pages, and one index page over them.

``python -m lessons_lib run`` calls :func:`write_report` once the lessons have run::

    runs/<stamp>/index.html      summary tables: status, wall time, peak memory, metrics, machine
    runs/<stamp>/<lesson>.html   each executed notebook (plots and formulas), failed ones included
    runs/<stamp>/mathjax/        the copy of MathJax 2.7 the pages typeset their formulas with

The pages are readable offline. nbconvert's default HTML loads MathJax and require.js from a CDN,
so without internet every formula would show as raw LaTeX. Here the pages load MathJax from the
run folder instead: a copy of the MathJax 2.7 that the ``jupyter-server-mathjax`` package ships
(the version nbconvert's template is written for; fonts: STIX-Web, the only ones it ships).
require.js and the widget and Mermaid loaders are left out: nothing in a lesson's static page
needs them. A widget is shown as a note naming its controls, followed by the output it printed
when the lesson ran. Without ``jupyter-server-mathjax`` the pages fall back to the CDN, and the
index page says so.
"""
from __future__ import annotations

import html
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import nbformat

MATHJAX_DIR = "mathjax"
# What the pages need from the package's MathJax: the combined TeX config preloads the rest.
_MATHJAX_PARTS = ("MathJax.js", "LICENSE", "config", "extensions", "jax/input/TeX", "jax/element",
                  "jax/output/HTML-CSS", "fonts/HTML-CSS/STIX-Web")
_MATHJAX_SKIP = ("a11y",)  # the accessibility explorer: 3.7 MB, loaded only from MathJax's menu
MATHJAX_QUERY = "config=TeX-AMS-MML_HTMLorMML-full,Safe"

_TEMPLATE = """{%- extends 'index.html.j2' -%}
{%- block html_head_js_requirejs -%}{%- endblock html_head_js_requirejs -%}
{%- block jupyter_widgets -%}{%- endblock jupyter_widgets -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
{%- block html_head_js_mathjax -%}
<script type="text/x-mathjax-config">
MathJax.Hub.Config({"HTML-CSS": {availableFonts: [], preferredFont: null, webFont: "STIX-Web", imageFont: null}});
</script>
{{ super() }}
{%- endblock html_head_js_mathjax -%}
{%- block body_header -%}
{{ super() }}
<nav style="padding: 0.5em 0; font-family: var(--jp-ui-font-family, sans-serif)"><a href="index.html">&larr; course report</a></nav>
{%- endblock body_header -%}
"""

# Parts of a metric name that carry its unit: (the words that replace the part in the label, unit).
_UNIT_PARTS = {
    "ms": ("time", "ms (milliseconds)"),
    "seconds": ("time", "s (seconds)"),
    "bytes": ("size", "bytes"),
    "acc": ("accuracy", "fraction correct (0-1)"),
    "ppl": ("perplexity", "perplexity"),
    "db": ("", "dB (decibels)"),
    "cosine": ("cosine similarity", "cosine similarity (1 = same direction)"),
    "speedup": ("speed-up", "x (times faster)"),
    "ratio": ("ratio", "x (ratio)"),
    "params": ("parameters", "count"),
}
# Parts that name a statistic only at the end of a name (``kd_minus_alone_p``).
_LAST_PARTS = {"p": ("p-value", "probability (0-1)"), "se": ("standard error", "")}
_WORDS = {"fp32": "FP32", "fp16": "FP16", "bf16": "BF16", "int8": "INT8", "int4": "INT4", "cpu": "CPU",
          "gpu": "GPU", "lm": "LM", "kd": "KD", "cnn": "CNN", "moe": "MoE", "minilm": "MiniLM", "gptq": "GPTQ",
          "gptqmodel": "GPTQModel", "rtn": "RTN", "sqnr": "SQNR", "iqr": "IQR", "rms": "RMS", "rel": "relative",
          "vs": "vs", "torchao": "torchao", "kl": "KL", "ffn": "FFN", "num": "number of", "feat": "feature",
          "val": "validation"}


def describe_metric(name: str) -> tuple[str, str]:
    """A readable label and unit for a metric, from the course's naming conventions.

    Example: ``describe_metric("minilm_int8_ms") == ("MiniLM INT8 time", "ms (milliseconds)")``;
    a name with no unit part gets ``""`` as its unit (``"busy_over_quiet_median"``).
    """
    parts = name.lower().split("_")
    words, unit = [], ""
    for i, part in enumerate(parts):
        known = _UNIT_PARTS.get(part) or (_LAST_PARTS.get(part) if i == len(parts) - 1 and i > 0 else None)
        if known:
            word, unit = known
            words.append(word)
        elif part in _WORDS:
            words.append(_WORDS[part])
        elif len(part) <= 3 and part[:1] in "wg" and part[1:].isdigit():
            words.append(part.upper())  # w4 (4-bit weights), g64 (groups of 64)
        else:
            words.append(part)
    label = " ".join(w for w in words if w)
    return label[:1].upper() + label[1:], unit


def format_value(name: str, value: Any) -> str:
    """A metric value as text: 4 significant digits, thousands separators, bytes also in MB."""
    if isinstance(value, bool) or isinstance(value, str):
        return str(value)
    if isinstance(value, int):
        text = f"{value:,}"
        return f"{text} ({value / 1e6:.3g} MB)" if name.endswith("_bytes") and value >= 10**5 else text
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def mathjax_source() -> Path | None:
    """The MathJax 2.7 folder the ``jupyter-server-mathjax`` package ships, or None without it."""
    try:
        import jupyter_server_mathjax
    except ImportError:
        return None
    static = Path(jupyter_server_mathjax.__file__).parent / "static"
    return static if (static / "MathJax.js").is_file() else None


def copy_mathjax(run_dir: Path) -> str | None:
    """Copy MathJax into ``run_dir/mathjax`` (about 3 MB); return the pages' relative URL for it,
    or None when no local copy is installed (the pages then load MathJax from the CDN)."""
    source = mathjax_source()
    if source is None:
        return None
    target = run_dir / MATHJAX_DIR
    for part in _MATHJAX_PARTS:
        src, dst = source / part, target / part
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns(*_MATHJAX_SKIP), dirs_exist_ok=True)
        else:
            shutil.copy2(src, dst)
    return f"{MATHJAX_DIR}/MathJax.js?{MATHJAX_QUERY}"


def _control(model: Mapping[str, Any]) -> list[str]:
    """``["bits = 4"]`` for a control widget's state (a slider, text box or dropdown), else []."""
    if "value" in model:
        value = model["value"]
    elif isinstance(model.get("index"), int) and "_options_labels" in model:  # dropdowns sync an index
        value = model["_options_labels"][model["index"]]
    else:
        return []
    return [f"{model.get('description') or 'value'} = {value!r}"]


def _widget_outputs(model_id: str, state: Mapping[str, Any]) -> tuple[list[str], list[dict]]:
    """The controls (``"x = 3"``) and captured outputs under a widget, depth first."""
    model = state.get(model_id, {}).get("state", {})
    controls = _control(model)
    outputs = list(model.get("outputs", []))
    for child in model.get("children", []):
        sub_controls, sub_outputs = _widget_outputs(str(child).removeprefix("IPY_MODEL_"), state)
        controls += sub_controls
        outputs += sub_outputs
    return controls, outputs


def static_widgets(nb: nbformat.NotebookNode) -> int:
    """Replace each widget output by a note naming its controls and the outputs it captured when
    the lesson ran (a static page has no kernel to move a slider). Returns how many were replaced."""
    state = nb.metadata.get("widgets", {}).get("application/vnd.jupyter.widget-state+json", {}).get("state", {})
    replaced = 0
    for cell in nb.cells:
        new_outputs = []
        for out in cell.get("outputs", []):
            view = out.get("data", {}).get("application/vnd.jupyter.widget-view+json")
            if view is None:
                new_outputs.append(out)
                continue
            controls, captured = _widget_outputs(view.get("model_id", ""), state)
            note = ("<p><em>Interactive explorer" + (f" ({html.escape(', '.join(controls))})" if controls else "")
                    + ": open the notebook in Jupyter to move its controls."
                    + (" Its output when the lesson ran:" if captured else "") + "</em></p>")
            new_outputs.append(nbformat.v4.new_output("display_data", data={"text/html": note}))
            new_outputs += [nbformat.from_dict(o) for o in captured]
            replaced += 1
        if "outputs" in cell:
            cell.outputs = new_outputs
    nb.metadata.pop("widgets", None)
    return replaced


def notebook_html(notebook: Path, mathjax_url: str | None) -> str:
    """An executed notebook as one HTML page (JupyterLab's look, images inline)."""
    import jinja2
    from nbconvert import HTMLExporter

    options = {"mathjax_url": mathjax_url} if mathjax_url else {}
    exporter = HTMLExporter(template_name="lab", template_file="report.html.j2",
                            extra_loaders=[jinja2.DictLoader({"report.html.j2": _TEMPLATE})], **options)
    nb = nbformat.read(notebook, as_version=4)
    static_widgets(nb)
    body, _ = exporter.from_notebook_node(nb, resources={"metadata": {"name": notebook.stem}})
    return body


@dataclass
class Report:
    """What :func:`write_report` wrote: the index, each lesson's page, and what went wrong."""

    index: Path
    pages: dict[str, str] = field(default_factory=dict)  # lesson -> its page, relative to the run
    problems: dict[str, str] = field(default_factory=dict)  # lesson (or "mathjax") -> what failed
    mathjax_url: str | None = None


def write_report(run_dir: Path, summary: Mapping[str, Any]) -> Report:
    """Render every lesson's executed notebook, then ``index.html``. A lesson whose page cannot be
    rendered is listed in ``problems`` (and on the index page); the others are still rendered.

    Args:
        run_dir: the run folder, holding the executed notebooks named in ``summary``.
        summary: the runner's summary (``summary.json``'s content).
    """
    report = Report(index=run_dir / "index.html")
    try:
        report.mathjax_url = copy_mathjax(run_dir)
    except OSError as err:
        report.problems["mathjax"] = f"could not copy MathJax into the run folder: {err}"
    for stem, lesson in summary["lessons"].items():
        notebook = run_dir / lesson["notebook"]
        if not notebook.is_file():
            report.problems[stem] = "no executed notebook: the lesson stopped before papermill wrote one"
            continue
        try:
            page = notebook.with_suffix(".html")
            page.write_text(notebook_html(notebook, report.mathjax_url), encoding="utf-8")
            report.pages[stem] = page.name
        except Exception as err:  # one bad page must not cost the others
            report.problems[stem] = f"could not render {notebook.name}: {type(err).__name__}: {err}"
    report.index.write_text(index_html(summary, report), encoding="utf-8")
    return report


_CSS = """body{font-family:system-ui,sans-serif;max-width:70em;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1.5em}th,td{border:1px solid #ccc;padding:0.25em 0.6em;text-align:left}
th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}code{font-size:0.9em}
.ok{color:#1a7f37;font-weight:bold}.failed{color:#c62828;font-weight:bold}.over{background:#ffebee}
pre{background:#f6f6f6;padding:0.6em;overflow-x:auto;white-space:pre-wrap}.note{color:#555}"""


def _e(value: Any) -> str:
    return html.escape(str(value))


def _table(header: list[str] | None, rows: list[list[str]]) -> str:
    """An HTML table; ``rows`` hold ``<td>``/``<th>`` cells that are HTML already (escape first)."""
    head = "<thead><tr>" + "".join(f"<th>{h}</th>" for h in header) + "</tr></thead>" if header else ""
    body = "".join("<tr>" + "".join(row) + "</tr>" for row in rows)
    return f"<table>{head}<tbody>{body}</tbody></table>"


def _lessons_table(summary: Mapping[str, Any], report: Report) -> str:
    limit = summary.get("memory_limit_mb")
    rows = []
    for stem, r in summary["lessons"].items():
        page = report.pages.get(stem)
        name = f'<a href="{_e(page)}">{_e(stem)}</a>' if page else _e(stem)
        status = "OK" if r["status"] == "ok" else "FAILED"
        rss = r.get("peak_rss_mb")
        over = rss is not None and limit is not None and rss > limit
        rss_text = "-" if rss is None else f"{rss:,.0f}" + (" (over the limit)" if over else "")
        rows.append([f"<td>{name}</td>", f"<td>{_e(r['title'])}</td>",
                     f'<td class="{r["status"]}">{status}</td>', f'<td class="num">{r["seconds"]:.0f}</td>',
                     f'<td class="num{" over" if over else ""}">{rss_text}</td>',
                     f"<td>{_e(r.get('device') or '-')}</td>",
                     f'<td><a href="{_e(r["notebook"])}">{_e(r["notebook"])}</a></td>'])
    return _table(["lesson", "title", "status", "wall time (s)", "peak RSS (MB)", "device", "notebook"], rows)


def _metrics_section(stem: str, r: Mapping[str, Any], report: Report) -> str:
    page = report.pages.get(stem)
    parts = [f'<h3 id="{_e(stem)}">{_e(stem)}: {_e(r["title"])}</h3>']
    if page:
        parts.append(f'<p><a href="{_e(page)}">Open the executed notebook</a></p>')
    if stem in report.problems:
        parts.append(f'<p class="failed">Page not rendered: {_e(report.problems[stem])}</p>')
    if r.get("error"):
        parts.append(f"<p class=\"failed\">FAILED</p><pre>{_e(r['error'])}</pre>")
    rows = []
    for name, value in r.get("metrics", {}).items():
        label, unit = describe_metric(name)
        rows.append([f"<td>{_e(label)}</td>", f'<td class="num">{_e(format_value(name, value))}</td>',
                     f"<td>{_e(unit or '-')}</td>", f"<td><code>{_e(name)}</code></td>"])
    table = _table(["metric", "value", "unit", "recorded as"], rows)
    parts.append(table if rows else '<p class="note">No metrics recorded.</p>')
    return "\n".join(parts)


def _memory_note(summary: Mapping[str, Any]) -> str:
    limit, over = summary.get("memory_limit_mb"), summary.get("over_memory_limit", [])
    if limit is None:
        return ""
    if over:
        names = ", ".join(f"{s} ({summary['lessons'][s]['peak_rss_mb']:,.0f} MB)" for s in over)
        return f'<p class="failed">Over Binder\'s memory limit ({limit:,.0f} MB, 2 GiB): {_e(names)}</p>'
    return f'<p class="note">Every lesson stayed under Binder\'s memory limit ({limit:,.0f} MB, 2 GiB).</p>'


def index_html(summary: Mapping[str, Any], report: Report) -> str:
    """The run's index page: lessons (status, time, memory), machine, then each lesson's metrics."""
    lessons = summary["lessons"]
    failed = [s for s, r in lessons.items() if r["status"] != "ok"]
    machine = summary.get("machine") or {}
    interval = summary.get("rss_sample_interval_s")
    sampled = f"sampled every {interval:g} s" if interval else "sampled"
    math = ("Formulas are typeset by the copy of MathJax in <code>mathjax/</code>: no internet needed."
            if report.mathjax_url else "Formulas load MathJax from the internet (install "
            "<code>jupyter-server-mathjax</code> for offline pages).")
    body = [
        f"<h1>Course run {_e(summary['run'])}</h1>",
        f"<p>Started {_e(summary['started'])}; {'full' if summary['full'] else 'quick'} mode; "
        f"overrides: {_e(summary['overrides'] or 'none')}; wall time {summary['seconds']:.0f} s; "
        f"{len(lessons) - len(failed)} passed, {len(failed)} failed.</p>",
        _memory_note(summary), "<h2>Lessons</h2>", _lessons_table(summary, report),
        '<p class="note">Peak RSS: resident memory of the lesson\'s kernel and the processes it started, '
        f"summed, {sampled} while it ran.</p>",
        "<h2>Machine</h2>",
        _table(None, [[f"<th>{_e(k)}</th>", f"<td>{_e(v)}</td>"] for k, v in machine.items()]),
        "<h2>Metrics</h2>", *(_metrics_section(s, r, report) for s, r in lessons.items()),
        f'<p class="note">{math} Terminal version of these tables: <a href="summary.md">summary.md</a>; '
        'numbers: <a href="summary.json">summary.json</a>.</p>',
    ]
    if "mathjax" in report.problems:
        body.append(f'<p class="failed">{_e(report.problems["mathjax"])}</p>')
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>Course run {_e(summary["run"])}'
            f"</title><style>{_CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
