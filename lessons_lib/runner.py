"""The course runner: execute every lesson headlessly with papermill and gather the numbers.

    python -m lessons_lib run                      # every lesson, quick defaults
    python -m lessons_lib run --only 01 03 -p device cpu
    python -m lessons_lib run --full               # the slow variants (meant for a GPU)
    python -m lessons_lib list                     # lessons and their parameters

Each run goes to a new folder ``runs/<timestamp>/`` holding the executed notebooks, each lesson's
``results/<lesson>.json``, ``summary.json`` / ``summary.md``, and ``index.html``: the course
report, linking every executed notebook rendered as a page (:mod:`lessons_lib.report`). The
runner samples each lesson's kernel memory and flags a lesson above Binder's 2 GiB. Every
argument is checked before the folder is made, so bad input changes nothing on disk.
"""
from __future__ import annotations

import argparse
import ast
import datetime as dt
import json
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from lessons_lib import course, hub, params

# Set by the runner itself; a user asks for them another way.
RESERVED = {"results_dir": "the runner puts results in the run folder", "quick": "use --full instead"}
# Binder gives a notebook 2 GiB; a lesson whose kernel goes above it is flagged in the summary.
MEMORY_LIMIT_MB = 2**31 / 1e6
RSS_SAMPLE_INTERVAL_S = 0.1


def _ipc_kernel_manager() -> type:
    """A Jupyter kernel manager on local IPC sockets instead of TCP: nothing listens on a port,
    and the kernel has no reason to print its 'running over TCP without encryption' warning.
    The sockets live in a fresh temporary folder (by default they would be made in the kernel's
    working directory, the notebooks folder, and outlive the run)."""
    import tempfile

    from jupyter_client.manager import KernelManager

    class _IPC(KernelManager):
        def __init__(self, **kwargs: Any) -> None:
            kwargs.setdefault("transport", "ipc")
            kwargs.setdefault("ip", str(Path(tempfile.mkdtemp(prefix="lessons-kernel-")) / "kernel-ipc"))
            super().__init__(**kwargs)

    return _IPC


class UsageError(ValueError):
    """Bad command-line input, reported before any work starts."""


@dataclass(frozen=True)
class Plan:
    lessons: list[course.Lesson]
    overrides: dict[str, Any]
    full: bool
    run_dir: Path


def parse_value(raw: str, name: str, default: Any) -> Any:
    """Turn a ``-p NAME VALUE`` string into a value of the type of the notebook's default.

    Raises:
        UsageError: when the value cannot be that type (e.g. ``-p seed abc``).
    """
    if default is None or isinstance(default, str):
        return raw
    if isinstance(default, bool):
        lowered = raw.strip().lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise UsageError(f"parameter {name!r} takes a bool (true/false), got {raw!r}")
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    if isinstance(default, int) and isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(default, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(default, (list, tuple)) and isinstance(value, (list, tuple)):
        return type(default)(value)
    raise UsageError(f"parameter {name!r} takes a {type(default).__name__} (default {default!r}), got {raw!r}")


def select(lessons: list[course.Lesson], only: Sequence[str] | None) -> list[course.Lesson]:
    """The lessons named by ``--only`` (numbers like ``03`` or stems), in course order."""
    if not only:
        return lessons
    by_key = {l.number: l for l in lessons} | {l.stem: l for l in lessons}
    unknown = [o for o in only if o.zfill(2) not in by_key and o not in by_key]
    if unknown:
        listing = ", ".join(f"{l.number} ({l.stem})" for l in lessons)
        raise UsageError(f"--only: unknown lesson(s) {unknown}; accepted: {listing}")
    wanted = {(by_key.get(o) or by_key[o.zfill(2)]).stem for o in only}
    return [l for l in lessons if l.stem in wanted]


def check_overrides(lessons: list[course.Lesson], pairs: Sequence[Sequence[str]]) -> dict[str, str]:
    """Check every ``-p NAME VALUE`` against the selected lessons; return the raw strings by name."""
    known: dict[str, Any] = {}
    for lesson in lessons:
        for name, default in lesson.parameters.items():
            known.setdefault(name, default)
    raw: dict[str, str] = {}
    for name, value in pairs:
        if name in RESERVED:
            raise UsageError(f"-p {name}: set by the runner ({RESERVED[name]})")
        if name not in known:
            accepted = ", ".join(sorted(n for n in known if n not in RESERVED))
            raise UsageError(f"-p {name}: no selected lesson has this parameter; accepted: {accepted}")
        raw[name] = value
    for lesson in lessons:  # every selected lesson that has the parameter checks it
        values = {n: parse_for(lesson, n, v) for n, v in raw.items() if n in lesson.parameters}
        if lesson.stem in params.LESSONS:
            found = params.problems(lesson.stem, lesson.parameters | values)
            if found:
                raise UsageError("\n".join(found))
    return raw


def parse_for(lesson: course.Lesson, name: str, raw: str) -> Any:
    """``raw`` as a value for ``lesson``: of its default's type, or, for a lesson with a
    specification (:mod:`lessons_lib.params`), as written, so that the specification's message
    (what the parameter accepts) is the one the user sees."""
    try:
        return parse_value(raw, name, lesson.parameters[name])
    except UsageError:
        if lesson.stem not in params.LESSONS:
            raise
        try:
            return ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            return raw


def check_sources(lessons: list[course.Lesson], raw: dict[str, str]) -> None:
    """A hub model given as a source must be loadable here (cached, or reachable): fail at once,
    not minutes into a lesson (:func:`lessons_lib.hub.check_source`)."""
    for lesson in lessons:
        for name, spec in params.LESSONS.get(lesson.stem, {}).items():
            if isinstance(spec, params.Source) and name in raw:
                try:
                    hub.check_source(raw[name])
                except (ValueError, hub.SourceUnavailable) as err:
                    raise UsageError(f"lesson {lesson.stem}: -p {name}: {err}") from None


def check_device(lessons: list[course.Lesson], raw: dict[str, str]) -> None:
    """Fail early when a lesson would ask for a device this machine does not have."""
    for lesson in lessons:
        device = raw.get("device", lesson.parameters.get("device", "auto"))
        if device in ("auto", "cpu"):
            continue
        from lessons_lib import session  # imports torch: only when a GPU is asked for

        try:
            session.pick_device(device)
        except ValueError as err:
            raise UsageError(f"-p device: {err}") from None


def new_run_dir(runs_dir: Path) -> Path:
    """A fresh, never-used folder ``runs_dir/YYYYmmdd-HHMMSS[-N]``."""
    runs_dir.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    for i in range(1000):
        candidate = runs_dir / (stamp if i == 0 else f"{stamp}-{i}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
    raise RuntimeError(f"could not make a new run folder under {runs_dir}")


def child_rss_bytes() -> int:
    """Resident memory of every process this one started, and theirs, summed: while a lesson
    runs, its kernel and anything the kernel started (shared pages count once per process).

    A process still running its parent's program is left out: between ``fork`` and ``exec`` (every
    subprocess start) a child reports its parent's whole RSS, which would count the parent twice.
    """
    import psutil

    me = psutil.Process()
    cmdlines, total = {me.pid: me.cmdline()}, 0
    for child in me.children(recursive=True):  # parents come before their children
        try:
            cmdlines[child.pid] = child.cmdline()
            if cmdlines[child.pid] != cmdlines.get(child.ppid()):
                total += child.memory_info().rss
        except psutil.Error:  # it ended between the listing and the reading
            pass
    return total


def peak_child_rss(fn: Callable[[], Any], interval_s: float = RSS_SAMPLE_INTERVAL_S) -> int:
    """Peak of :func:`child_rss_bytes` while ``fn()`` runs, above its value at the start, in bytes.

    The kernel is a separate process, so its memory is sampled from here, every ``interval_s``,
    by the sampler of :func:`lessons_lib.measure.peak_memory_bytes` reading the child processes
    (a peak shorter than the interval can be missed).
    """
    from lessons_lib import measure

    return measure.peak_memory_bytes(fn, "cpu", interval_s=interval_s, read_rss=child_rss_bytes)


def run_lesson(lesson: course.Lesson, plan: Plan, kernel: str | None, timeout: int | None) -> dict[str, Any]:
    """Execute one notebook with papermill; never raises for a failing notebook."""
    import papermill

    values = {n: parse_for(lesson, n, v) for n, v in plan.overrides.items() if n in lesson.parameters}
    values |= {"quick": not plan.full, "results_dir": str(plan.run_dir / "results")}
    output = plan.run_dir / lesson.path.name
    start = time.perf_counter()
    status, error = "ok", None

    def execute() -> None:
        nonlocal status, error
        try:
            papermill.execute_notebook(
                str(lesson.path), str(output), parameters=values, cwd=str(lesson.path.parent),
                kernel_name=kernel, progress_bar=False, execution_timeout=timeout,
                kernel_manager_class=_ipc_kernel_manager(),
            )
        except Exception as err:  # a failing lesson is reported, the rest still run
            status, error = "failed", "".join(traceback.format_exception_only(type(err), err)).strip()[-2000:]

    peak_bytes = peak_child_rss(execute)
    seconds = time.perf_counter() - start
    from lessons_lib import results

    result_file = plan.run_dir / "results" / f"{lesson.stem}.json"
    record = results.load(result_file) if result_file.exists() else None
    if status == "ok" and record is None:
        status, error = "failed", f"ran, but wrote no {result_file.name}"
    return {
        "status": status, "seconds": round(seconds, 1), "error": error, "notebook": output.name,
        "peak_rss_mb": round(peak_bytes / 1e6, 1) if peak_bytes > 0 else None,
        "title": lesson.title, "parameters": values,
        "device": record["device"] if record else None,
        "metrics": record["metrics"] if record else {},
    }


def over_memory_limit(lessons: dict[str, Any]) -> list[str]:
    """The lessons whose kernel went above Binder's 2 GiB."""
    return [stem for stem, r in lessons.items() if (r["peak_rss_mb"] or 0) > MEMORY_LIMIT_MB]


def memory_line(summary: dict[str, Any]) -> str:
    """One sentence: which lessons went above Binder's memory limit, if any."""
    limit = f"Binder's memory limit ({summary['memory_limit_mb']:,.0f} MB, 2 GiB)"
    over = summary["over_memory_limit"]
    if not over:
        return f"Every lesson stayed under {limit}."
    named = ", ".join(f"{s} ({summary['lessons'][s]['peak_rss_mb']:,.0f} MB)" for s in over)
    return f"Over {limit}: {named}."


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    from lessons_lib import report

    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = [f"# Course run {run_dir.name}", "",
             f"Mode: {'full' if summary['full'] else 'quick'}; overrides: {summary['overrides'] or 'none'}; "
             f"wall time {summary['seconds']:.0f} s.", "", memory_line(summary), "",
             "| lesson | status | seconds | peak RSS (MB) | device |", "|---|---|---|---|---|"]
    for stem, r in summary["lessons"].items():
        rss = "-" if r["peak_rss_mb"] is None else f"{r['peak_rss_mb']:.0f}"
        lines.append(f"| {stem} | {r['status']} | {r['seconds']:.0f} | {rss} | {r['device'] or '-'} |")
    if summary.get("report"):
        lines += ["", f"Rendered notebooks and these tables with units: {summary['report']} (open in a browser)."]
    for stem, r in summary["lessons"].items():
        lines += ["", f"## {stem}: {r['title']}", ""]
        if r["error"]:
            lines += ["```", r["error"], "```", ""]
        if r["metrics"]:
            lines += ["| metric | value | unit |", "|---|---|---|"]
            for k, v in r["metrics"].items():
                value = f"{v:.6g}" if isinstance(v, float) else v
                lines.append(f"| {k} | {value} | {report.describe_metric(k)[1] or '-'} |")
    (run_dir / "summary.md").write_text("\n".join(lines) + "\n")


def plan_run(args: argparse.Namespace) -> Plan:
    """Validate everything; only then make the run folder."""
    lessons = course.discover(args.notebooks)
    if not lessons:
        raise UsageError(f"--notebooks: no NN_topic.ipynb lessons in {args.notebooks}")
    chosen = select(lessons, args.only)
    overrides = check_overrides(chosen, args.p or [])
    check_device(chosen, overrides)
    check_sources(chosen, overrides)
    return Plan(chosen, overrides, args.full, new_run_dir(Path(args.runs_dir)))


def cmd_run(args: argparse.Namespace) -> int:
    plan = plan_run(args)  # first: bad input is refused before torch is even imported
    from tqdm.auto import tqdm

    from lessons_lib import session
    print(f"Run folder: {plan.run_dir}", flush=True)
    started, t0 = dt.datetime.now().isoformat(timespec="seconds"), time.perf_counter()
    ran: dict[str, Any] = {}
    bar = tqdm(plan.lessons, unit="lesson", file=sys.stdout)
    for lesson in bar:
        bar.set_description(lesson.stem)
        ran[lesson.stem] = run_lesson(lesson, plan, args.kernel, args.timeout)
        if ran[lesson.stem]["status"] != "ok":
            bar.write(f"FAILED {lesson.stem}: {ran[lesson.stem]['error']}")
    summary = {"run": plan.run_dir.name, "started": started, "seconds": round(time.perf_counter() - t0, 1),
               "full": plan.full, "overrides": plan.overrides, "lessons": ran,
               "machine": session.machine_info(session.pick_device("auto")),
               "memory_limit_mb": MEMORY_LIMIT_MB, "rss_sample_interval_s": RSS_SAMPLE_INTERVAL_S,
               "over_memory_limit": over_memory_limit(ran)}
    summary["report"] = write_report(plan.run_dir, summary)
    write_summary(plan.run_dir, summary)
    failed = [s for s, r in ran.items() if r["status"] != "ok"]
    print(memory_line(summary))
    print(f"{len(ran) - len(failed)} passed, {len(failed)} failed; summary: {plan.run_dir / 'summary.md'}"
          + (f"; report: {plan.run_dir / summary['report']}" if summary["report"] else ""))
    return 1 if failed else 0


def write_report(run_dir: Path, summary: dict[str, Any]) -> str | None:
    """Write ``index.html`` and the lessons' pages; return the index's name, or None if it could
    not be written. Never raises: a broken report must not hide the lessons' own results."""
    try:
        from lessons_lib import report

        written = report.write_report(run_dir, summary)
    except Exception:  # reported, and the run's exit status stays the lessons'
        print(f"The HTML report failed (summary.md and summary.json are still written):\n{traceback.format_exc()}",
              file=sys.stderr)
        return None
    for what, problem in written.problems.items():
        print(f"report: {what}: {problem}", file=sys.stderr)
    return written.index.name


def cmd_list(args: argparse.Namespace) -> int:
    for lesson in course.discover(args.notebooks):
        specs = params.LESSONS.get(lesson.stem, {})
        print(f"{lesson.number}  {lesson.stem}: {lesson.title}")
        for name, default in lesson.parameters.items():
            accepted = f"  ({specs[name].describe()})" if name in specs else ""
            print(f"      {name} = {default!r}{accepted}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lessons_lib", description="Run the compression course headlessly.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="execute lessons with papermill into a new runs/<timestamp>/ folder")
    run.add_argument("--only", nargs="+", metavar="NN", help="lesson numbers (e.g. 00 03) or notebook stems")
    run.add_argument("--full", action="store_true", help="run the slow variants (quick=False); meant for a GPU")
    run.add_argument("-p", nargs=2, action="append", metavar=("NAME", "VALUE"),
                     help="set a parameter in every selected lesson that has it (repeatable)")
    run.add_argument("--runs-dir", default=str(course.repo_root() / "runs"), help="parent of run folders")
    run.add_argument("--notebooks", default=str(course.default_notebooks_dir()), help="folder of NN_topic.ipynb")
    run.add_argument("--kernel", default=None, help="Jupyter kernel name (default: the notebook's)")
    run.add_argument("--timeout", type=int, default=None, help="seconds allowed per cell")
    run.set_defaults(func=cmd_run)
    lst = sub.add_parser("list", help="list lessons and their parameters")
    lst.add_argument("--notebooks", default=str(course.default_notebooks_dir()))
    lst.set_defaults(func=cmd_list)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UsageError as err:
        parser.error(str(err))  # exits with status 2 and the message
    return 2
