"""The house rules every lesson notebook follows (see ../shared/STYLE.md and the README)."""
import ast
import re

import nbformat
import pytest

from lessons_lib import course, params as specs

NOTEBOOKS = sorted(course.default_notebooks_dir().glob("*.ipynb"))


def test_the_course_has_lessons():
    assert NOTEBOOKS, "no notebooks found: these checks would pass vacuously"
    assert NOTEBOOKS[0].name == "00_orientation.ipynb"


@pytest.fixture(params=NOTEBOOKS, ids=lambda p: p.name)
def notebook(request):
    return request.param, nbformat.read(request.param, as_version=4)


def _code(nb):
    return [c for c in nb.cells if c.cell_type == "code"]


def test_file_name_is_NN_topic(notebook):
    path, _ = notebook
    assert course.LESSON_FILE_RE.match(path.name), f"{path.name}: want NN_topic.ipynb (two digits, snake_case)"


def test_first_cell_is_a_markdown_title(notebook):
    path, nb = notebook
    assert nb.cells[0].cell_type == "markdown"
    assert nb.cells[0].source.startswith("# "), f"{path.name}: first cell must start with a '# Title'"


def test_one_parameters_cell_of_literals_with_the_required_names(notebook):
    path, nb = notebook
    cell = course.parameters_cell(nb)  # exactly one, or ValueError
    assert _code(nb)[0] is cell, "the parameters cell must be the first code cell"
    params = course.read_parameters(nb)  # literals only, or ValueError
    missing = [p for p in course.REQUIRED_PARAMETERS if p not in params]
    assert not missing, f"{path.name}: parameters cell lacks {missing}"
    assert params["quick"] is True, "the default must be the quick variant"
    assert params["device"] == "auto"
    assert isinstance(params["seed"], int) and isinstance(params["results_dir"], str)
    for line in cell.source.splitlines():
        assert "#" in line, f"{path.name}: every parameter needs a comment: {line!r}"


def test_every_parameter_has_a_specification_and_its_default_passes_it(notebook):
    path, nb = notebook
    stem = path.stem
    assert stem in specs.LESSONS, f"{path.name}: add its parameters' specifications to lessons_lib/params.py"
    declared, spec = course.read_parameters(nb), specs.LESSONS[stem]
    assert not set(declared) - set(spec), f"{path.name}: parameters without a specification: {set(declared) - set(spec)}"
    assert not set(spec) - set(declared), f"params.py names parameters {path.name} lacks: {set(spec) - set(declared)}"
    for rule in specs.RULES.get(stem, ()):
        assert set(rule.names) <= set(declared), f"a rule of {stem} names unknown parameters {rule.names}"
    assert specs.problems(stem, declared) == [], "the defaults must pass their own specifications"


def test_make_test_sizes_are_the_declared_ones_and_pass_the_check(notebook):
    path, nb = notebook
    cell = course.parameters_cell(nb)
    assert cell.metadata.get("nbmake", {}) == course.test_sizes_metadata(path.stem), (
        f"{path.name}: run course.sync_test_sizes on it (params.TEST_SIZES changed)")
    sizes = specs.TEST_SIZES.get(path.stem, {})
    declared = course.read_parameters(nb)
    assert set(sizes) <= set(declared), f"TEST_SIZES names parameters {path.name} lacks"
    assert all(sizes[n] != declared[n] for n in sizes), "a test size equal to the default is noise in the table"
    assert specs.problems(path.stem, declared | sizes) == []


def test_test_sizes_only_name_lessons_that_exist():
    assert set(specs.TEST_SIZES) <= {p.stem for p in NOTEBOOKS}


def test_sync_refuses_test_sizes_the_lesson_would_refuse(tmp_path, monkeypatch):
    source = NOTEBOOKS[0]
    copy = tmp_path / source.name
    copy.write_text(source.read_text(encoding="utf-8"), encoding="utf-8")
    monkeypatch.setitem(specs.TEST_SIZES, source.stem, {"seed": -1})
    with pytest.raises(specs.ParameterError, match="seed = -1"):
        course.sync_test_sizes(copy)
    monkeypatch.setitem(specs.TEST_SIZES, source.stem, {"seed": 5})
    assert course.sync_test_sizes(copy) is True and course.sync_test_sizes(copy) is False
    assert course.parameters_cell(course.read_notebook(copy))["metadata"]["nbmake"] == {"mock": {"seed": 5}}


def test_parameters_are_checked_right_after_the_colab_cell(notebook):
    path, nb = notebook
    code = _code(nb)
    assert code[2].source == course.check_cell_source(path.stem), (
        f"{path.name}: the cell after the Colab cell must be course.check_cell_source({path.stem!r})")


def test_outputs_are_cleared(notebook):
    path, nb = notebook
    for cell in _code(nb):
        assert not cell.outputs and cell.execution_count is None, f"{path.name}: commit with outputs cleared"


def test_colab_cell_follows_the_parameters_and_is_the_canonical_one(notebook):
    path, nb = notebook
    code = _code(nb)
    colab = [c for c in code if c.source.startswith(course.COLAB_MARKER)]
    assert len(colab) == 1, f"{path.name}: needs exactly one Colab set-up cell"
    assert code[1] is colab[0], "the Colab cell comes right after the parameters cell"
    assert colab[0].source == course.colab_cell_source(), "regenerate it from course.colab_cell_source()"


def test_library_is_imported_by_module_and_nothing_installs_outside_colab(notebook):
    path, nb = notebook
    imports_lessons_lib = False
    for cell in _code(nb):
        src = cell.source
        is_colab = src.startswith(course.COLAB_MARKER)
        assert not re.search(r"^\s*[!%]\s*pip", src, re.M), f"{path.name}: no !pip / %pip"
        assert is_colab or "pip install" not in src, f"{path.name}: installs only in the Colab cell"
        assert "sys.path" not in src, f"{path.name}: no sys.path edits"
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lessons_lib"):
                assert node.module == "lessons_lib", f"{path.name}: import modules, not names: from {node.module} import ..."
                assert all(a.name != "*" for a in node.names), f"{path.name}: no import *"
                imports_lessons_lib = True
            if isinstance(node, ast.ImportFrom):
                assert all(a.name != "*" for a in node.names), f"{path.name}: no import *"
    assert imports_lessons_lib, f"{path.name}: use lessons_lib (from lessons_lib import module)"


def test_lesson_records_its_results_under_its_own_name(notebook):
    path, nb = notebook
    src = "\n".join(c.source for c in _code(nb))
    assert f'LESSON = "{path.stem}"' in src, f"{path.name}: set LESSON = \"{path.stem}\""
    assert "results.record(" in src and "results_dir=results_dir" in src


def test_lesson_asserts_what_it_teaches(notebook):
    path, nb = notebook
    asserts = sum(isinstance(n, ast.Assert) for c in _code(nb) for n in ast.walk(ast.parse(c.source)))
    assert asserts >= 2, f"{path.name}: a lesson asserts its claims (found {asserts} assert statements)"


def test_readme_lists_every_lesson_and_uses_the_configured_repository():
    readme = (course.repo_root() / "README.md").read_text()
    for path in NOTEBOOKS:
        assert f"(notebooks/{path.name})" in readme, f"README's lesson table lacks {path.name}"
    slug = course.REPO_URL.removeprefix("https://github.com/")
    badges = re.findall(r"(?:mybinder\.org/v2/gh|colab\.research\.google\.com/github)/([^/]+/[^/]+)/", readme)
    assert badges and all(b == slug for b in badges), f"badges must point at {course.REPO_URL}"


def test_makefile_test_target_is_what_ci_runs():
    ci = (course.repo_root() / ".ci" / "run").read_text()
    readme = (course.repo_root() / "README.md").read_text()
    assert "make test" in readme and ci.strip().splitlines()[-1] == "make test"


def test_no_two_notebooks_define_a_helper_of_the_same_name():
    """What two lessons both need lives in lessons_lib (show.table, measure.interleaved, stats verdicts, ...);
    two notebooks defining a function or class of the same name is a helper that belongs there."""
    defined: dict[str, list[str]] = {}
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        for cell in _code(nb):
            try:
                tree = ast.parse(cell.source)
            except SyntaxError:  # IPython magics; none of our cells has one
                continue
            for node in tree.body:
                if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                    defined.setdefault(node.name, []).append(path.stem)
    shared = {name: stems for name, stems in defined.items() if len(set(stems)) > 1}
    assert not shared, f"move these helpers to lessons_lib (or name each lesson's own differently): {shared}"
