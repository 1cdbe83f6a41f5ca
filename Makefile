# `make up`: install into .venv and start a local network with the bundled model.
# `make test`: install into .venv and run the test suite.
VENV ?= .venv
PY := $(VENV)/bin/python
# llama-cpp-python builds from source; a portable build keeps pip's cached wheel usable
# on any x86-64 machine.
export CMAKE_ARGS ?= -DGGML_NATIVE=OFF

.PHONY: install up test lint bench vendor clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[llama,embed,audio,image,score,shard,test]'
	touch $@

install: $(VENV)/.installed

up: install
	$(VENV)/bin/covey up

lint: install
	$(PY) -m ruff check src tests bench

test: install lint
	$(PY) -m pytest

bench: install
	$(PY) -m pip install -q -e '.[llama,embed,audio,image,score,shard,bench]'
	$(PY) bench/overhead.py

# Refresh the web page's pinned libraries (libsodium, marked, DOMPurify; axe-core for the
# tests) from npm; versions and checksums land in vendor/VENDOR.json. Needs npm, only here.
vendor:
	python3 scripts/vendor_web.py

clean:
	rm -rf $(VENV) .covey
