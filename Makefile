# janus-lab developer entry points. Run from the repo root.
#
#   make venv      create .venv and install the project (re-runs when pyproject.toml changes)
#   make up        start the local stack: SeaweedFS S3 + MLflow + Ray head (run/stack/)
#   make status    what runs, on which ports, and whether it is healthy
#   make down      stop it
#
# Add targets in their own section below; keep `PY` as the one way to reach the venv's Python.

PY := .venv/bin/python

.DEFAULT_GOAL := help

.PHONY: help
help:
	@sed -n 's/^#   \(make .*\)/\1/p' $(MAKEFILE_LIST)

# --- environment ---

.PHONY: venv
venv: .venv/.installed

.venv:
	python3 -m venv .venv

# torch first and pinned: installed before the rest, pip keeps this build instead of resolving
# one itself (a GPU machine installs the CUDA build of the same version here instead).
.venv/.installed: pyproject.toml | .venv
	.venv/bin/pip install torch==2.13.0
	.venv/bin/pip install -e '.[test]'
	touch $@

# Targets that only need a working interpreter depend on $(PY), not on the stamp, so editing
# pyproject.toml does not trigger a reinstall before every `make up`.
$(PY):
	$(MAKE) venv

# --- local stack ---
# SeaweedFS S3 + MLflow + Ray head; data, logs and PID files under run/stack/ (janus_lab/stack/).
# Ports come from JANUS_* variables (python -m janus_lab.stack --help lists them), e.g.
#   JANUS_S3_PORT=9000 make up
# STACK_ARGS passes options through, e.g. `make up STACK_ARGS=--no-ray`.
# The Ray head keeps token auth on (its GCS listens on every interface): `source
# run/stack/env.sh` before `ray status`, `ray job submit` or `serve deploy`.

STACK_ARGS ?=

.PHONY: up down status
up: | $(PY)
	$(PY) -m janus_lab.stack up $(STACK_ARGS)

down: | $(PY)
	$(PY) -m janus_lab.stack down $(STACK_ARGS)

status: | $(PY)
	$(PY) -m janus_lab.stack status $(STACK_ARGS)

# --- data ---
#   make sample-data   writes the procedural sample dataset (ShareGPT-4o-Image layout) to data/sample

SAMPLE_DIR ?= data/sample

.PHONY: sample-data
sample-data: | $(PY)
	@if [ -f $(SAMPLE_DIR)/text_to_image.json ]; then echo "$(SAMPLE_DIR) exists"; \
	else $(PY) jobs/sample_data.py --out $(SAMPLE_DIR); fi

# --- the two README commands ---
#   make test      the whole suite (unit + integration) in .venv
#   make demo      the miniature study on the local stack: world data -> ingest to S3 -> finetune -> score ->
#                  promote -> generate -> 2x2 ablation x 2 seeds -> CFG sweep -> serve

.PHONY: test demo browser
test: venv browser
	$(PY) -m pytest -q --durations=15 $(if $(CI),,-m "not slow")

# The playground's browser test drives Debian's chromium through its chromedriver (browsers that
# a tool downloads by itself cannot be fetched on these machines); installed once, when missing.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		{ echo "installing chromium and chromedriver (apt)"; \
		  $$(command -v sudo >/dev/null && [ "$$(id -u)" != 0 ] && echo sudo) apt-get update -qq && \
		  DEBIAN_FRONTEND=noninteractive $$(command -v sudo >/dev/null && [ "$$(id -u)" != 0 ] && echo sudo) \
		  apt-get install -y -qq chromium chromium-driver >/dev/null; }

demo: venv
	$(MAKE) up
	bash infra/local/demo.sh

# --- generation ---
#   make generate PROMPT="a red circle" MODEL=debug   images + contact sheet in outputs/generated

MODEL ?= debug
PROMPT ?= a red circle on a blue square

.PHONY: generate
generate: | $(PY)
	$(PY) jobs/generate.py model=$(MODEL) prompt="$(PROMPT)"

# --- serving ---
#   make serve        deploy serve/config.yaml (the champion) on the running local stack
#   make serve-down   remove it

.PHONY: serve serve-down
serve: | $(PY)
	. run/stack/env.sh && .venv/bin/serve deploy serve/config.yaml && echo "http://127.0.0.1:8000/v1/models"

serve-down: | $(PY)
	. run/stack/env.sh && .venv/bin/serve shutdown -y
