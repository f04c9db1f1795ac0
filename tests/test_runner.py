"""The course runner: argument checking before any work, and a real papermill run of tiny lessons."""
import json
from pathlib import Path

import nbformat
import pytest
import torch

from lessons_lib import course, runner

PARAMS = 'quick = True  # fast\ndevice = "auto"  # where\nseed = 0  # seed\nresults_dir = "../results"  # out\nn = 3  # size\nname = "x"  # label\n'


def _lesson(path, title, body, params=PARAMS):
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell(params)
    cell.metadata["tags"] = ["parameters"]
    nb.cells = [nbformat.v4.new_markdown_cell(f"# {title}"), cell, nbformat.v4.new_code_cell(body)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


RECORD = (
    "from lessons_lib import results\n"
    "results.record('{stem}', {{'twice_n': 2 * n, 'name_len': len(name)}}, parameters={{'n': n}},"
    " results_dir=results_dir, device='cpu', quick=quick)\n"
)


# Holds 200 MB (written, so resident) for a second: several samples of the runner's RSS sampler.
ALLOCATE = "blob = b'x' * 200_000_000\nimport time\ntime.sleep(1.0)\n"


@pytest.fixture
def course_dir(tmp_path):
    nbs = tmp_path / "notebooks"
    nbs.mkdir()
    _lesson(nbs / "00_alpha.ipynb", "Alpha", RECORD.format(stem="00_alpha"))
    _lesson(nbs / "01_broken.ipynb", "Broken", "raise RuntimeError('this lesson is broken on purpose')")
    _lesson(nbs / "02_gamma.ipynb", "Gamma", RECORD.format(stem="02_gamma") + ALLOCATE)
    (nbs / "scratch.ipynb").write_text("{}")  # not a lesson: ignored
    return tmp_path


def _args(course_dir, *extra):
    return ["run", "--notebooks", str(course_dir / "notebooks"), "--runs-dir", str(course_dir / "runs"), *extra]


def test_discover_reads_lessons_and_parameters(course_dir):
    lessons = course.discover(course_dir / "notebooks")
    assert [l.stem for l in lessons] == ["00_alpha", "01_broken", "02_gamma"]
    assert lessons[0].title == "Alpha"
    assert lessons[0].parameters == {"quick": True, "device": "auto", "seed": 0, "results_dir": "../results", "n": 3, "name": "x"}


def test_parameters_cell_must_hold_literals_only(tmp_path):
    _lesson(tmp_path / "00_bad.ipynb", "Bad", "pass", params="import os\nn = 3\n")
    with pytest.raises(ValueError, match="only 'name = literal'"):
        course.discover(tmp_path)
    _lesson(tmp_path / "00_bad.ipynb", "Bad", "pass", params="n = len('abc')\n")
    with pytest.raises(ValueError, match="not a literal"):
        course.discover(tmp_path)


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--only", "07"], r"--only: unknown lesson\(s\) \['07'\]; accepted: 00 \(00_alpha\)"),
        (["-p", "nope", "1"], r"-p nope: no selected lesson has this parameter; accepted: device, n, name, seed"),
        (["-p", "n", "abc"], r"parameter 'n' takes a int \(default 3\), got 'abc'"),
        (["-p", "n", "2.5"], r"parameter 'n' takes a int"),
        (["-p", "results_dir", "/tmp"], r"-p results_dir: set by the runner"),
        (["-p", "quick", "false"], r"use --full instead"),
        (["-p", "device", "tpu"], r"device must be one of"),  # fake lessons have no specification
    ],
)
def test_bad_input_is_refused_before_anything_is_written(course_dir, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_info:
        runner.main(_args(course_dir, *extra))
    assert exit_info.value.code == 2
    assert __import__("re").search(message, capsys.readouterr().err)
    assert not (course_dir / "runs").exists()


def test_cuda_without_a_gpu_is_refused_before_anything_is_written(course_dir, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        runner.main(_args(course_dir, "-p", "device", "cuda"))
    assert "no CUDA GPU" in capsys.readouterr().err
    assert not (course_dir / "runs").exists()


def test_parse_value_follows_the_default_type():
    assert runner.parse_value("5", "n", 3) == 5
    assert runner.parse_value("5", "ratio", 0.5) == 5.0
    assert runner.parse_value("False", "quick", True) is False
    assert runner.parse_value("facebook/opt-125m", "model", "zoo") == "facebook/opt-125m"
    assert runner.parse_value("123", "model", "zoo") == "123"
    assert runner.parse_value("[1, 2]", "sizes", (4,)) == (1, 2)
    with pytest.raises(runner.UsageError, match="bool"):
        runner.parse_value("maybe", "quick", True)


def test_new_run_dir_never_reuses_a_folder(tmp_path):
    first, second = runner.new_run_dir(tmp_path), runner.new_run_dir(tmp_path)
    assert first != second and first.is_dir() and second.is_dir()


def test_a_real_run_reports_failures_and_keeps_going(course_dir):
    code = runner.main(_args(course_dir, "--only", "0", "01", "02_gamma", "-p", "n", "21", "-p", "name", "abcd"))
    assert code == 1  # one lesson failed
    (run_dir,) = (course_dir / "runs").iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    lessons = summary["lessons"]
    assert [s for s in lessons] == ["00_alpha", "01_broken", "02_gamma"]
    assert lessons["01_broken"]["status"] == "failed"
    assert "broken on purpose" in lessons["01_broken"]["error"]
    for stem in ("00_alpha", "02_gamma"):
        assert lessons[stem]["status"] == "ok"
        assert lessons[stem]["metrics"] == {"twice_n": 42, "name_len": 4}  # computed by the notebook
        assert (run_dir / f"{stem}.ipynb").exists()
    summary_md = (run_dir / "summary.md").read_text()
    assert "| 01_broken | failed |" in summary_md and "| twice_n | 42 |" in summary_md

    # Peak memory of each kernel: gamma holds 200 MB more than alpha, which does the same otherwise.
    rss = {stem: lessons[stem]["peak_rss_mb"] for stem in lessons}
    assert all(v > 10 for v in rss.values()), rss
    assert 150 < rss["02_gamma"] - rss["00_alpha"] < 400, rss
    assert summary["over_memory_limit"] == [] and summary["memory_limit_mb"] == pytest.approx(2147.48, abs=0.01)
    assert f"| 02_gamma | ok | {lessons['02_gamma']['seconds']:.0f} | {rss['02_gamma']:.0f} | cpu |" in summary_md
    assert "Every lesson stayed under Binder's memory limit" in summary_md
    assert summary["report"] == "index.html" and (run_dir / "index.html").is_file()
    assert summary["machine"]["cpu_count"] >= 1
    leftovers = [p.name for p in (course_dir / "notebooks").iterdir() if p.suffix != ".ipynb"]
    assert not leftovers, f"the run left files beside the notebooks: {leftovers}"

    # A second run gets its own folder and leaves the first untouched.
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    assert runner.main(_args(course_dir, "--only", "00", "--full")) == 0
    assert len(list((course_dir / "runs").iterdir())) == 2
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


def test_kernel_sockets_are_made_in_a_private_temporary_folder_not_beside_the_notebooks():
    import tempfile

    a, b = runner._ipc_kernel_manager()(), runner._ipc_kernel_manager()()
    assert a.transport == "ipc"
    for km in (a, b):
        path = Path(km.ip)
        assert path.is_absolute() and path.parent.parent == Path(tempfile.gettempdir()), km.ip
    assert Path(a.ip).parent != Path(b.ip).parent  # a killed run's sockets never collide with the next


def test_peak_child_rss_sees_memory_held_by_a_child_process():
    import subprocess
    import sys

    def child(code):
        return lambda: subprocess.run([sys.executable, "-c", code], check=True)

    idle = runner.peak_child_rss(child("import time; time.sleep(0.6)"))
    busy = runner.peak_child_rss(child("import time; blob = b'x' * 200_000_000; time.sleep(0.6)"))
    assert idle > 1e6, idle  # a Python interpreter is a few MB at least
    assert 150e6 < busy - idle < 300e6, (idle, busy)
    # A fork shares its parent's pages: counted once, not twice (and a subprocess being started,
    # between fork and exec, never counts its parent again).
    forked = runner.peak_child_rss(child(
        "import os, time; blob = b'x' * 200_000_000; pid = os.fork(); time.sleep(0.6); pid and os.waitpid(pid, 0)"))
    assert abs(forked - busy) < 50e6, (busy, forked)
    assert runner.peak_child_rss(lambda: None) == 0  # no child, nothing measured


def _summary(**rss):
    lessons = {s: {"peak_rss_mb": mb} for s, mb in rss.items()}
    return {"memory_limit_mb": runner.MEMORY_LIMIT_MB, "over_memory_limit": runner.over_memory_limit(lessons),
            "lessons": lessons}


def test_memory_line_names_the_lessons_over_binders_limit():
    assert runner.memory_line(_summary(a=100.0, b=None)).startswith("Every lesson stayed under")
    line = runner.memory_line(_summary(a=100.0, b=2500.0, c=2147.0, d=2148.0))  # 2 GiB = 2147.48 MB
    assert line == "Over Binder's memory limit (2,147 MB, 2 GiB): b (2,500 MB), d (2,148 MB)."


def test_a_broken_report_never_breaks_the_run(tmp_path, monkeypatch, capsys):
    def broken(run_dir, summary):
        raise RuntimeError("nbconvert exploded")

    from lessons_lib import report

    monkeypatch.setattr(report, "write_report", broken)
    assert runner.write_report(tmp_path, {}) is None
    assert "nbconvert exploded" in capsys.readouterr().err
