#!/usr/bin/env bash
# Reproduce what a learner's first Colab run of lesson 00 does, without Colab: a fresh virtual
# environment holding only what a Colab runtime preinstalls (torch as a CPU build, transformers,
# numpy, scikit-learn, matplotlib, ipywidgets, psutil; nbclient + ipykernel to execute), a kernel in
# which `google.colab` is imported at start (a fake module), and the notebook's Colab cell
# regenerated from course.colab_cell_source() so that it clones this repository instead of GitHub's
# and runs `pip install -e <clone>[colab]`. Then lesson 00 runs top to bottom; the check passes if
# it finished, wrote its results json, and torch is still the preinstalled 2.13.0+cpu.
# Everything happens in a temporary folder; the repository is not touched.
#   bash scripts/colab_check.sh              # the Colab cell clones the committed HEAD
#   bash scripts/colab_check.sh --worktree   # ... a snapshot of the working tree (uncommitted edits)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
mode=${1:-head}
case "$mode" in head | --worktree) ;; *) echo "usage: $0 [--worktree]" >&2; exit 2 ;; esac
lesson=00_orientation
work=$(mktemp -d -t colab-check-XXXXXX)
echo "working in $work"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
venv="$work/venv"
target="$work/content/model-compression-course"  # Colab's /content/model-compression-course
mkdir -p "$work/content"
started=$(date +%s)
phase_start=$started
phase() {  # phase NAME: print the wall time since the previous phase ended
  local now
  now=$(date +%s)
  printf 'phase %-42s %5d s\n' "$1" $((now - phase_start)) | tee -a "$work/times.txt"
  phase_start=$now
}
pin() {  # pin NAME: NAME==version as requirements.txt pins it
  local line
  line=$(grep -iE "^$1==" "$repo/requirements.txt") || { echo "requirements.txt does not pin $1" >&2; exit 1; }
  echo "${line%%#*}" | tr -d ' '
}

# 1. A Colab-like runtime: its preinstalls only, at the versions this course tested.
python3 -m venv "$venv"
index=()
if curl -sfI --max-time 10 https://download.pytorch.org/whl/cpu/ >/dev/null 2>&1; then
  index=(--extra-index-url https://download.pytorch.org/whl/cpu)
fi
torch_pin="$(pin torch)+cpu"  # the CPU build: an unpinned torch pulls a multi-GB CUDA one
preinstalls=("$torch_pin")
for p in transformers numpy scikit-learn matplotlib ipywidgets psutil nbclient ipykernel; do
  preinstalls+=("$(pin "$p")")
done
# (this machine's pip configuration names local indexes that lack most packages: drop pip's
# warnings about them, keep everything else it says)
"$venv/bin/python" -m pip install -q --no-input "${index[@]}" "${preinstalls[@]}" 2>&1 \
  | { grep -v 'is ignored: it is neither a file nor a directory' || true; }
"$venv/bin/python" -m pip list --format=freeze >"$work/pip-before.txt"
phase "1. venv with Colab's preinstalls"

# 2. What the clone will fetch: HEAD of this repository, or a committed snapshot of the working tree.
if [ "$mode" = --worktree ]; then
  source_repo="$work/worktree"
  mkdir "$source_repo"
  tar -C "$repo" -c --exclude=./.git --exclude=./.venv --exclude=./runs --exclude=./results \
    --exclude='*.egg-info' --exclude=__pycache__ --exclude=.ipynb_checkpoints --exclude=.pytest_cache \
    --exclude=./logs --exclude=./build --exclude=./.whl . | tar -C "$source_repo" -x
  git -C "$source_repo" init -q
  git -C "$source_repo" add -A
  git -C "$source_repo" -c user.name=colab-check -c user.email=colab-check@localhost commit -q -m snapshot
  files="$source_repo"
else
  source_repo="$repo"
  files="$work/head"  # the notebook as GitHub shows it, and the course.py of the same commit
  mkdir "$files"
  git -C "$repo" archive HEAD lessons_lib/course.py "notebooks/$lesson.ipynb" | tar -x -C "$files"
fi

# The kernel: `google.colab` importable (a namespace package beside protobuf's google/, so no
# google/__init__.py) and imported at start by an IPython startup file, as on Colab. The startup
# file also records which Python the kernel is, so the check knows the venv ran the notebook.
site_packages=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
mkdir -p "$site_packages/google/colab"
echo '"""A stand-in for Colab'"'"'s google.colab package (scripts/colab_check.sh)."""' >"$site_packages/google/colab/__init__.py"
export IPYTHONDIR="$work/ipython"
export JUPYTER_DATA_DIR="$work/jupyter"  # no user-level kernelspec can replace the venv's python3
mkdir -p "$IPYTHONDIR/profile_default/startup"
cat >"$IPYTHONDIR/profile_default/startup/00-fake-colab.py" <<EOF
import sys
import google.colab  # noqa: F401  (Colab's kernel has it imported)
open("$work/kernel.txt", "w").write(sys.executable + "\n" + str("google.colab" in sys.modules) + "\n")
EOF

# The notebook as a learner opens it, its Colab cell pointed at the local repository.
"$venv/bin/python" - "$files/lessons_lib/course.py" "file://$source_repo" "$target" \
  "$files/notebooks/$lesson.ipynb" "$work/$lesson.ipynb" <<'EOF'
import importlib.util
import sys

import nbformat

course_py, repo_url, target, src, dst = sys.argv[1:]
spec = importlib.util.spec_from_file_location("course", course_py)  # lessons_lib is not installed yet
course = importlib.util.module_from_spec(spec)
sys.modules["course"] = course  # dataclasses look their module up there
spec.loader.exec_module(course)
nb = nbformat.read(src, as_version=4)
cells = [c for c in nb.cells if c.cell_type == "code" and c.source.startswith(course.COLAB_MARKER)]
if len(cells) != 1:
    sys.exit(f"{src}: expected one Colab cell, found {len(cells)}")
cells[0].source = course.colab_cell_source(repo_url=repo_url, target=target)
nbformat.write(nb, dst)
EOF
phase "2. source, fake google.colab, notebook"

# 3. Lesson 00 in that kernel, from the folder Colab starts in (/content); the Colab cell clones,
# installs lessons_lib[colab] and moves to <clone>/notebooks, so results land in <clone>/results.
# (the kernel's pip writes to this script's stderr, as on Colab to its log; the same local-index
# warnings as in phase 1 are dropped)
if ! "$venv/bin/python" - "$work/$lesson.ipynb" "$work/$lesson.executed.ipynb" "$work/content" \
  2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2) <<'EOF'
import sys
from datetime import datetime

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

src, dst, cwd = sys.argv[1:]
nb = nbformat.read(src, as_version=4)
client = NotebookClient(nb, timeout=1800, kernel_name="python3", resources={"metadata": {"path": cwd}})
try:
    client.execute()
    failed = False
except CellExecutionError as err:
    print(err, file=sys.stderr)
    failed = True
finally:
    nbformat.write(nb, dst)


def seconds(cell):
    t = cell.get("metadata", {}).get("execution", {})
    if "iopub.execute_input" not in t or "shell.execute_reply" not in t:
        return 0.0
    parse = lambda s: datetime.fromisoformat(s.replace("Z", "+00:00"))
    return (parse(t["shell.execute_reply"]) - parse(t["iopub.execute_input"])).total_seconds()


code = [c for c in nb.cells if c.cell_type == "code"]
colab = next(c for c in code if c.source.startswith("# Colab set-up"))
print(f"  Colab cell (git clone + pip install -e .[colab]): {seconds(colab):.0f} s")
print(f"  the other {len(code) - 1} code cells: {sum(seconds(c) for c in code if c is not colab):.0f} s")
sys.exit(1 if failed else 0)
EOF
then
  echo "FAILED: lesson $lesson stopped; executed copy: $work/$lesson.executed.ipynb" >&2
  exit 1
fi
phase "3. lesson $lesson, Colab branch"

# 4. What must hold afterwards.
fail() { echo "FAILED: $*" >&2; exit 1; }
read -r kernel_python kernel_colab <<<"$(tr '\n' ' ' <"$work/kernel.txt")"
[ "$kernel_python" = "$venv/bin/python" ] || [ "$(readlink -f "$kernel_python")" = "$(readlink -f "$venv/bin/python")" ] \
  || fail "the kernel ran $kernel_python, not the venv's python"
[ "$kernel_colab" = True ] || fail "google.colab was not imported at kernel start"
[ -d "$target/.git" ] || fail "the Colab cell did not clone into $target"
cd "$work"  # not the repository, whose lessons_lib would shadow the installed one
installed_from=$("$venv/bin/python" -c 'import lessons_lib, pathlib; print(pathlib.Path(lessons_lib.__file__).parents[1])')
[ "$installed_from" = "$target" ] || fail "lessons_lib is imported from $installed_from, not the clone"
"$venv/bin/python" - "$target/results/$lesson.json" "$lesson" <<'EOF' || fail "no valid results json"
import json
import sys

path, lesson = sys.argv[1:]
data = json.load(open(path))
assert data["lesson"] == lesson and data["metrics"], data
print(f"  {path}: {len(data['metrics'])} metrics, e.g. minilm_params = {data['metrics'].get('minilm_params')}")
EOF
"$venv/bin/python" -m pip list --format=freeze >"$work/pip-after.txt"
grep -qx "torch==$(pin torch | cut -d= -f3)+cpu" "$work/pip-after.txt" || fail "torch changed: $(grep -i '^torch==' "$work/pip-after.txt")"
! grep -qi '^nvidia-' "$work/pip-after.txt" || fail "CUDA wheels were installed: $(grep -i '^nvidia-' "$work/pip-after.txt" | tr '\n' ' ')"
echo "  $(grep -i '^torch==' "$work/pip-after.txt") kept; installed or changed by the Colab cell:"
comm -13 <(sort "$work/pip-before.txt") <(sort "$work/pip-after.txt") | tr '\n' ' ' | fold -s -w 96 | sed 's/^/    /'
echo
"$venv/bin/python" -m pip check || fail "pip check found broken requirements"
"$venv/bin/python" - "$target/pyproject.toml" >"$work/imports.log" 2>&1 <<'EOF' \
  || fail "a package of the colab extra does not import: $work/imports.log"
import importlib
import os
import re
import sys
import tomllib

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")  # GPTQModel's import needs it on 2-core machines
extra = tomllib.loads(open(sys.argv[1]).read())["project"]["optional-dependencies"]["colab"]
for requirement in extra:  # each member's import name is its PyPI name with "_" for "-"
    importlib.import_module(re.match(r"[A-Za-z0-9._-]+", requirement)[0].lower().replace("-", "_"))
EOF
echo "  every package of the colab extra imports"
phase "4. checks"
echo "colab check passed in $(($(date +%s) - started)) s ($work)"
