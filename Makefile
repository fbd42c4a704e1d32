# The two set-up commands of README.md. Each creates .venv if needed.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: dev test lint

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,production]'
	touch $@

dev: $(VENV)/.installed
	mkdir -p .ooni/dagster_home
	cp dagster.yaml .ooni/dagster_home/dagster.yaml
	DAGSTER_HOME=$${DAGSTER_HOME:-$(CURDIR)/.ooni/dagster_home} $(VENV)/bin/dagster dev -h 127.0.0.1 -p 3000

test: $(VENV)/.installed
	$(VENV)/bin/ruff check ooni_pipeline ooni_pipeline_tests bench
	$(VENV)/bin/pytest

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check --fix ooni_pipeline ooni_pipeline_tests bench
	$(VENV)/bin/ruff format ooni_pipeline ooni_pipeline_tests bench
