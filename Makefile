# hybrid - common tasks.  Every target that runs code depends on `setup`,
# which is idempotent and quick once the machine and .venv are ready.

PYTHON      ?= .venv/bin/python
CONFORMANCE ?= ../shared/bpf_conformance/tests
ENGINES     ?= interp jit aot
ARGS        ?=

.PHONY: setup test demo bench clean distclean

setup:
	bash scripts/setup.sh

test: setup
	$(PYTHON) -m pytest -q $(ARGS)

# The main job: the example agent combining a kernel program and a userspace
# probe in one map (examples/threadstat), after the VM's conformance run.
demo: setup
	@set -e; for engine in $(ENGINES); do \
		echo "== conformance, engine $$engine"; \
		.venv/bin/hybrid conformance $(CONFORMANCE) --engine $$engine; \
	done
	@echo "== threadstat: kernel raw_tp/sys_enter + userspace uprobe, one shared map"
	$(PYTHON) examples/threadstat/threadstat.py $(ARGS)

bench: setup
	$(PYTHON) bench/run.py $(ARGS)

# Build products and caches; `distclean` also removes the virtualenv.
clean:
	rm -rf build *.egg-info hybrid/_native*.so hybrid/_native.c hybrid/_native.o \
		.pytest_cache .hypothesis
	find . -path ./.venv -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf .venv
