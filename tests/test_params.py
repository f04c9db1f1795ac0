"""Lesson parameters: each kind of specification, and every lesson refusing one bad value of each
kind it has through the runner (no kernel, no run folder), and one bad value per lesson, every kind
at least once, through papermill (the notebook's own check cell, before anything is written)."""
import math
import time

import pytest

from lessons_lib import course, params, runner

LESSONS = {lesson.stem: lesson for lesson in course.discover()}


def test_kinds_accept_and_refuse_what_they_say():
    assert params.Int(1).accepts(1) and not params.Int(1).accepts(0) and not params.Int(1).accepts(True)
    assert not params.Int(1).accepts(2.0) and params.Int(2, 8).accepts(8) and not params.Int(2, 8).accepts(9)
    unit = params.Number(0, 1, open_low=True)
    assert unit.accepts(1) and unit.accepts(0.5) and not unit.accepts(0.0) and not unit.accepts(math.nan)
    assert params.Number(0, 1, open_high=True).describe() == "a number in [0, 1)"
    assert params.Choice((2, 3, 4, 8)).accepts(4) and not params.Choice((2, 3, 4, 8)).accepts(4.0)
    assert params.Flag().accepts(False) and not params.Flag().accepts(0)
    assert params.Device().accepts("cuda:1") and not params.Device().accepts("gpu")
    assert params.Source().accepts("facebook/opt-125m") and params.Source().accepts("zoo")
    assert not params.Source().accepts("not an id!") and not params.Source().accepts(3)
    assert params.ListOf(params.Int(1)).accepts([1, 2]) and not params.ListOf(params.Int(1)).accepts([])
    assert not params.ListOf(params.Int(1)).accepts([1, 0]) and not params.Text().accepts("  ")


def test_source_accepts_a_folder_holding_a_saved_model(tmp_path):
    assert not params.Source().accepts(str(tmp_path / "no such model!"))
    (tmp_path / "my model").mkdir()
    (tmp_path / "my model" / "config.json").write_text("{}")
    assert params.Source().accepts(str(tmp_path / "my model"))


def test_check_names_lesson_parameter_value_and_what_is_accepted():
    values = dict(LESSONS["03_gptq"].parameters, calibration_samples=-5)
    with pytest.raises(params.ParameterError) as err:
        params.check("03_gptq", values)
    assert str(err.value) == "lesson 03_gptq: calibration_samples = -5 is not accepted; it takes an integer >= 1"
    with pytest.raises(KeyError, match="no value for parameter"):
        params.check("03_gptq", {"quick": True})


def test_rules_between_parameters():
    values = dict(LESSONS["04_quantization_aware_training"].parameters, warmup_steps=500, qat_steps=100)
    assert params.problems("04_quantization_aware_training", values) == [
        "lesson 04_quantization_aware_training: warmup_steps must be smaller than qat_steps "
        "(got warmup_steps = 500, qat_steps = 100)"]


def _bad(spec):
    """One value the specification refuses."""
    kind = type(spec)
    if kind is params.Int:
        return spec.minimum - 1
    if kind is params.Number:
        return spec.low if spec.open_low else spec.high + 1
    if kind is params.Choice:
        return max(spec.options) + 1
    if kind is params.ListOf:
        return []
    return {params.Flag: "yes", params.Text: " ", params.Device: "tpu", params.Source: "no such model!"}[kind]


def _one_of_each_kind(stem, skip=()):
    chosen = {}
    for name, spec in params.LESSONS[stem].items():
        if name not in skip:
            chosen.setdefault(type(spec).__name__, (name, spec))
    return [(stem, kind, name, spec) for kind, (name, spec) in chosen.items()]


RUNNER_CASES = [c for stem in LESSONS for c in _one_of_each_kind(stem, skip=runner.RESERVED)]
def _papermill_cases():
    """One kernel per lesson is slow (seconds each): every lesson once, each with a kind not yet
    covered where it has one, then one more case for any kind still uncovered. The check cell is
    the same call in every notebook; the runner cases above test every kind of every lesson."""
    cases, covered = [], set()
    for stem in LESSONS:
        options = _one_of_each_kind(stem)
        case = next((c for c in options if c[1] not in covered), options[0])
        cases.append(case)
        covered.add(case[1])
    for stem in LESSONS:
        cases += [c for c in _one_of_each_kind(stem) if c[1] not in covered and not covered.add(c[1])]
    return cases


PAPERMILL_CASES = _papermill_cases()


def _id(case):
    return f"{case[0][:2]}-{case[1]}-{case[2]}"


def test_every_lesson_has_cases_and_every_kind_is_covered():
    assert set(LESSONS) == set(params.LESSONS)
    kinds = {c[1] for c in PAPERMILL_CASES}
    assert kinds == {"Int", "Number", "Choice", "Flag", "Text", "Device", "Source", "ListOf"}


@pytest.mark.parametrize("case", RUNNER_CASES, ids=_id)
def test_runner_refuses_a_bad_value_before_anything_starts(case, tmp_path, capsys, monkeypatch):
    stem, _, name, spec = case
    monkeypatch.setattr(runner, "run_lesson", lambda *a, **k: pytest.fail("a lesson was started"))
    value = "maybe" if isinstance(spec, params.Flag) else _bad(spec)  # the runner reads "yes" as True
    raw = value if isinstance(value, str) else repr(value)
    runs = tmp_path / "runs"
    start = time.perf_counter()
    with pytest.raises(SystemExit) as exit_info:
        runner.main(["run", "--only", stem[:2], "--runs-dir", str(runs), "-p", name, raw])
    assert exit_info.value.code == 2
    assert time.perf_counter() - start < 5, "a bad value must be refused at once"
    err = capsys.readouterr().err
    parsed = runner.parse_for(LESSONS[stem], name, raw)  # e.g. "0" is 0.0 for a float parameter
    assert f"lesson {stem}: {name} = {parsed!r} is not accepted; it takes {spec.describe()}" in err, err
    assert not runs.exists(), "nothing may be written for a refused run"


@pytest.mark.parametrize("case", PAPERMILL_CASES, ids=_id)
def test_notebook_refuses_a_bad_value_in_its_first_cell_after_the_parameters(case, tmp_path):
    import papermill

    stem, _, name, spec = case
    results_dir = tmp_path / "results"
    results_dir.mkdir()
    parameters = {"results_dir": str(results_dir)} | {name: _bad(spec)}
    with pytest.raises(papermill.PapermillExecutionError) as err:
        papermill.execute_notebook(str(LESSONS[stem].path), str(tmp_path / "out.ipynb"), parameters=parameters,
                                   cwd=str(LESSONS[stem].path.parent), progress_bar=False,
                                   kernel_manager_class=runner._ipc_kernel_manager())
    assert err.value.ename == "ParameterError"
    assert f"lesson {stem}: {name} = {_bad(spec)!r} is not accepted; it takes {spec.describe()}" in err.value.evalue
    assert err.value.cell_index == 4, "the check runs right after the parameters (+ injected) and Colab cells"
    assert not any(results_dir.iterdir()), "nothing may be written before the check"
