#!/usr/bin/env bash
# Prepare, on a machine with PyPI access, the wheels that scripts/gpu_check.sh installs on the lent
# GPU machine (Python 3.12, torch + CUDA, transformers, no Jupyter stack, no network). They go to
# .whl/ (git-ignored) and travel with the device call (carry: [".whl"]). Versions follow this
# repository's .venv so both machines run the same Jupyter stack.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
names="papermill nbformat nbclient ipykernel jupyter_client jupyter_core traitlets pyzmq tornado comm
debugpy ipython matplotlib-inline nest-asyncio2 psutil jedi parso pexpect ptyprocess prompt_toolkit
wcwidth pygments stack_data executing asttokens pure_eval ipython_pygments_lexers click pyyaml tenacity
entrypoints fastjsonschema jsonschema attrs jsonschema-specifications referencing rpds-py platformdirs
tqdm python-dateutil tzdata six typing_extensions packaging requests charset_normalizer idna urllib3 certifi"
rm -rf .whl && mkdir -p .whl
specs=$($PY - $names <<'PYEOF'
import importlib.metadata as md, sys
print(" ".join(f"{n}=={md.version(n)}" for n in sys.argv[1:]))
PYEOF
)
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl $specs
du -sh .whl && ls .whl | wc -l
