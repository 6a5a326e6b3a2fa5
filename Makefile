# Set-up is part of every target: a local .venv is created and the project installed on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test test-deps lint bench chaos clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,bench]'
	touch $@

demo: $(VENV)/.installed  ## the fan-in workflow on a local embedded Ray (TASKS=1000)
	$(PY) examples/fan_in.py --tasks $(or $(TASKS),1000)

# The browser test's headless Chromium + chromedriver and the JS example's node (Debian packages),
# installed only where chromedriver is missing and apt-get exists (CI and a fresh machine run as root).
test-deps:
	@need=""; [ -x /usr/bin/chromedriver ] || need="chromium chromium-driver"; \
	command -v node >/dev/null 2>&1 || need="$$need nodejs"; \
	if [ -n "$$need" ] && command -v apt-get >/dev/null 2>&1; then \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$need; \
	fi

test: $(VENV)/.installed test-deps  ## lint + types + the whole test suite
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy --ignore-missing-imports api shards cluster
	$(PY) -m pytest

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

bench: $(VENV)/.installed test-deps  ## every benchmark: tables on stdout, JSON in bench/results/
	$(PY) -m bench.latency
	$(PY) -m bench.hotkey
	$(PY) -m bench.durability
	$(PY) -m bench.triggers
	$(PY) -m bench.compare
	$(PY) -m bench.recovery
	$(PY) -m bench.failover
	$(PY) -m bench.console_load
	$(PY) -m bench.sse_latency

chaos: $(VENV)/.installed  ## the chaos harness: SEEDS seeded fault schedules (default 20) on a 4-node local Ray
	$(PY) -m bench.chaos --seeds $(or $(SEEDS),20) --faults $(or $(FAULTS),6)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis bench/results
