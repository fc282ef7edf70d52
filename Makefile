# The two commands of the README quick start: `make demo` and `make test`.
# Both create (or reuse) .venv with the exact CI pins of constraints/ci.txt.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.saltsegment-installed
DEMO_OUT ?= demo-output

.PHONY: demo test venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints/ci.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints/ci.txt -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/saltsegment demo --out $(DEMO_OUT)

# Two workers, one test file each at a time (module fixtures stay per file); see Testing/conftest.py.
# glibc keeps freed memory in the test processes: by default it maps every block above 32 MiB afresh
# and unmaps it on free; the page faults made system time a fifth of the suite's CPU time on 2 cores.
# The product keeps glibc's default (lower peak memory); test_memory_estimate measures it that way.
TEST_MALLOC := MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296
test: $(STAMP)
	$(TEST_MALLOC) $(PY) -m pytest -n 2 --dist loadfile --durations=20 Testing

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache
