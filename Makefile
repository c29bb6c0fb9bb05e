# gradserve developer commands. Needs only Python 3.11 with pip (and venv).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: venv demo test mutation compose-test serve protos clean

venv: $(STAMP)

# Dev/CI install: constraints.txt pins the CPU torch wheel and the stub generators.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)  ## start a server, run the seed examples and the digits example, stop the server
	$(PY) scripts/demo.py

# Two workers, each taking a whole file at a time (--dist loadfile): a file's module
# fixtures (servers) start once, and its timing-sensitive tests never run beside each
# other. Most of the suite waits on servers, so two workers overlap those waits.
test: $(STAMP)  ## the whole suite
	$(PY) -m pytest -q -n 2 --dist loadfile

# Not part of `make test`: mutmut on the codec, stream framing, runtime, handle store, checks,
# the servicer's error mapping and the client's autograd bridge, in shards of fast in-process
# tests. Writes benchmarks/results/mutation.txt. MUTATION_ARGS="--shards wire" for one shard.
mutation: $(STAMP)  ## mutation testing (mutmut); results in benchmarks/results/mutation.txt
	$(PY) scripts/mutation.py $(MUTATION_ARGS)

# Root, Debian 12, with podman runc debootstrap docker-compose netavark aardvark-dns iptables
# catatonit (.ci/run installs them). Caches the base image and wheelhouse in
# ~/.cache/gradserve-compose (GRADSERVE_COMPOSE_CACHE). See README.md, "Deploy".
compose-test: $(STAMP)  ## build the images, run the integration suite through docker-compose on Podman
	$(PY) scripts/compose_test.py

serve: $(STAMP)  ## serve the built-in examples on 127.0.0.1:50051 (Ctrl-C to stop)
	$(VENV)/bin/gradserve serve

protos: $(STAMP)  ## regenerate the stubs after editing protos/gradserve/v1/gradserve.proto
	$(PY) scripts/gen_protos.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis .mutation
