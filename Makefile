# tubescope: `make demo`, `make test`, `make bench`. The first run builds .venv (about 2 minutes).
#
# torch is installed first and pinned by a constraint file, so that nothing else can pull a multi-GB CUDA build
# onto a CPU machine. For a GPU build see README.md ("GPU install").

PYTHON      ?= python3
VENV        ?= .venv
TORCH_SPEC  ?= torch==2.13.0
PY          := $(VENV)/bin/python
PIP         := $(PY) -m pip
STAMP       := $(VENV)/.tubescope-installed
CONSTRAINTS := $(VENV)/torch-constraint.txt
PYTEST_ARGS ?=
BENCH_OUT   ?= .bench

.PHONY: venv demo test system-packages bench clean-venv

venv: $(STAMP)

# Rebuilt only when pyproject.toml (or this Makefile) changes; an existing .venv is reused, not recreated.
$(STAMP): pyproject.toml Makefile
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "tubescope needs Python >= 3.11, this is " + sys.version'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install '$(TORCH_SPEC)'
	$(PY) -c 'import torch; print("torch==" + torch.__version__.split("+")[0])' > $(CONSTRAINTS)
	$(PIP) install -c $(CONSTRAINTS) -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/tubescope demo

# The Debian packages the tests use (ffmpeg, redis-server, GStreamer's RTSP server, prometheus): installed when
# missing (as root or with sudo), otherwise named with the command to install them.
system-packages:
	@bash .ci/system-packages

test: system-packages $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

# Each bench/*.py prints one JSON report; copies go to $(BENCH_OUT)/.
bench: $(STAMP)
	@mkdir -p $(BENCH_OUT)
	@found=0; for f in bench/*.py; do \
		[ -e "$$f" ] || continue; case "$$(basename $$f)" in _*) continue;; esac; \
		found=1; echo "== $$f"; $(PY) $$f | tee $(BENCH_OUT)/$$(basename $$f .py).json || exit 1; \
	done; \
	if [ $$found = 0 ]; then echo "no benchmarks found in bench/" >&2; exit 2; fi

clean-venv:
	rm -rf $(VENV)
