# dirtydiff: `make demo` and `make test` set everything up on Debian 12 (as
# root or with sudo) and run; set-up is idempotent and quick when done.

VENV    := .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
DEB_PKGS := nbdkit nbdkit-plugin-python python3-libnbd libnbd-bin qemu-utils fio \
            python3-venv python3-msgpack prometheus
# openssl: the TLS tests and benchmark make their certificates with it.
DEB_PKGS += openssl
# What only `make bench` needs: qemu-storage-daemon (copy-before-write,
# snapshot-access), the peer of `python -m bench snapshot-read`, QEMU's own
# fleecing; it pulls in many packages that no test needs.
BENCH_PKGS := qemu-system-common
SUDO    := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

# $(call install_missing,PKGS): apt-get installs those of PKGS that are not
# installed, and does nothing (quickly) when all are.
install_missing = missing=$$(for p in $(1); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null \
	    | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	    echo "installing Debian packages: $$missing"; \
	    $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	    $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

.PHONY: setup demo test test-slow test-torture test-fuzz lint bench install-units clean

setup: $(STAMP)

# Debian packages: installed only when one is missing, so a second run is quick.
.deb-installed: Makefile
	@$(call install_missing,$(DEB_PKGS))
	@touch $@

# The venv comes from Debian's python3 with system site-packages: libnbd's
# bindings (import nbd) exist only as python3-libnbd, and nbdkit's plugin
# embeds that same interpreter.
$(STAMP): .deb-installed pyproject.toml
	@[ -x $(PY) ] || /usr/bin/python3 -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	@touch $@

demo: setup
	$(PY) -m sidecar.demo

ALERTS := contrib/prometheus/dirtydiff-alerts

# The linters, the alert rules' checks and unit tests, then the suite: a green
# `make test` means typed and clean too (the suite last, so that its summary
# closes the output).
test: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	promtool check rules $(ALERTS).yml
	promtool test rules $(ALERTS).test.yml
	$(PY) -m pytest -q -m 'not slow and not bench'

test-slow: setup
	$(PY) -m pytest -q -m slow

# The torture suite's long run: 200 seeded scenarios of faults, each ending
# with byte-for-byte restores; the last line is the summary and the seed.
# Root: each scenario mounts a small tmpfs as its state directory.
TORTURE_ARGS ?= --seed $$(date +%s)
test-torture: setup
	$(PY) -m tests.torture --scenarios 200 $(TORTURE_ARGS)

# The fuzzers' long run: every Hypothesis target with many examples, then
# each atheris (libFuzzer) target; new inputs go to a scratch corpus first.
FUZZ_EXAMPLES ?= 20000
FUZZ_RUNS ?= 20000
test-fuzz: setup
	DIRTYDIFF_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest -q --timeout=0 tests/test_fuzz.py
	@scratch=$$(mktemp -d); trap 'rm -rf "$$scratch"' EXIT; \
	for target in nbd_parsers:nbd control_parsers:control nbd_server:nbd control_server:control; do \
	    mkdir -p "$$scratch/$${target%%:*}"; \
	    $(PY) -m tests.fuzz.$${target%%:*} -atheris_runs=$(FUZZ_RUNS) \
	        "$$scratch/$${target%%:*}" tests/fuzz/corpus/$${target##*:} || exit 1; \
	done

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# Every benchmark, each against its peer in the same run, ending with one
# table of ratios and targets; `make bench BENCH_ARGS=--quick` for small sizes.
# The benchmarks' own packages, then the tests of the harness that need them
# (marked bench), then the benchmarks.
bench: setup
	@$(call install_missing,$(BENCH_PKGS))
	$(PY) -m pytest -q -m bench
	$(PY) -m bench $(BENCH_ARGS)

# The units expect this clone at /opt/dirtydiff (see systemd/*.service).
install-units: setup
	$(SUDO) install -m 0644 systemd/dirtydiff-track@.service systemd/dirtydiff-sidecar@.service /etc/systemd/system/
	$(SUDO) install -d -m 0755 /etc/dirtydiff
	$(SUDO) systemctl daemon-reload

clean:
	rm -rf $(VENV) .deb-installed .pytest_cache .mypy_cache .ruff_cache
