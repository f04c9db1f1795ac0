# The course's two commands (see README):
#   make course   install (first time) and run every lesson headlessly into runs/<timestamp>/
#   make test     install (first time) and run the unit tests plus every notebook (nbmake)
# Extra runner options: make course ARGS="--only 01 03 -p device cpu"

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=

.PHONY: course test install

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --no-input -r requirements.txt -e .
	touch $@

course: install
	$(PY) -m lessons_lib run $(ARGS)

# Two test workers, one thread each: on a 2-core machine two 2-thread workers spend most of their
# time waiting on each other's threads (small ops were measured 60x slower that way).
# --dist worksteal: a worker that runs out of tests takes queued ones from the other, instead of idling
# while the other works through a long notebook and the tests queued behind it.
test: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -n 2 --dist worksteal
