#!/usr/bin/env bash
# Reproduce what repo2docker (mybinder.org) does with binder/, without Docker: take the committed
# tree, make a fresh virtual environment, install binder/requirements.txt from the repository root,
# run binder/postBuild, then execute lesson 00 through binder/start. Everything happens in a
# temporary folder; the repository is not touched.
#   bash scripts/binder_check.sh            # uses HEAD
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d -t binder-check-XXXXXX)
echo "working in $work"
mkdir "$work/repo"
git -C "$repo" archive HEAD | tar -x -C "$work/repo"
if ! curl -sfI --max-time 10 https://download.pytorch.org/whl/cpu/ >/dev/null 2>&1; then
  # This machine cannot reach PyTorch's CPU wheel index (only PyPI): drop that line from the copy.
  # torch==2.13.0+cpu then has to come from a local wheel, as it does on the course's build machines.
  echo "note: download.pytorch.org is unreachable; installing torch==2.13.0+cpu without that index"
  sed -i '/^--extra-index-url/d' "$work/repo/binder/requirements.txt"
fi
python3 -m venv "$work/venv"
export PATH="$work/venv/bin:$PATH"
cd "$work/repo"
python -m pip install --no-input -r binder/requirements.txt
bash binder/postBuild
bash binder/start python -m lessons_lib run --only 00 --runs-dir "$work/runs"
cat "$work"/runs/*/summary.md
echo "binder check passed ($work)"
