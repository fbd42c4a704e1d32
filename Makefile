# The two set-up commands of README.md. Each creates .venv if needed.
VENV ?= .venv
PY := $(VENV)/bin/python
# ClickHouse 24.8 (chdb 3.3.0 embeds 24.8.4), the release OONI's cluster runs: the
# tests' server-24.8 back end serves it from a process run by this environment.
CH24 := .venv-ch24

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

$(CH24)/.installed: pyproject.toml
	python3 -m venv $(CH24)
	$(CH24)/bin/python -m pip install --quiet --upgrade pip
	$(CH24)/bin/python -m pip install --quiet --group clickhouse-24-8
	touch $@

test: $(VENV)/.installed $(CH24)/.installed
	$(VENV)/bin/ruff check ooni_pipeline ooni_pipeline_tests bench
	$(VENV)/bin/pytest

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check --fix ooni_pipeline ooni_pipeline_tests bench
	$(VENV)/bin/ruff format ooni_pipeline ooni_pipeline_tests bench
