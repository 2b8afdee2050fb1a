# Every target creates .venv when it is missing, so a fresh clone needs only `make serve`
# or `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: help serve test test-quick bench soak clean

help:
	@echo "make serve          install into .venv and serve on http://127.0.0.1:8080 (ARGS=... for barosync serve)"
	@echo "make test           the whole suite, then the protocol suites on two nodes (PYTEST_ARGS=..., PARALLEL= for one process)"
	@echo "make test-quick     the suite without slow, browser and cluster tests (a minute; for the edit-test loop)"
	@echo "make bench          the benchmark beside its peers (ARGS=--smoke for a quick run; bench/README.md)"
	@echo "make soak           a long run watching memory, descriptors and latency"
	@echo "make binary         the one-file PyInstaller binary in dist/barosync"
	@echo "make test-binary    build it and run tests/test_binary.py against it"
	@echo "make vendor         refresh the vendored npm libraries of the web app (version and license kept)"
	@echo "make clean          remove .venv, build and dist"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@ $(VENV)/.installed

serve: $(VENV)/.installed
	$(BIN)/barosync serve $(ARGS)

# The whole suite, then the protocol suites again on a two-node cluster: every
# in-process server gets a second node on the same PostgreSQL log and Redis bus, and
# clients connect to the two in turn (BAROSYNC_TEST_CLUSTER=1, tests/conftest.py).
CLUSTER_CONFORMANCE := tests/test_server.py tests/test_rest.py tests/test_conflicts.py tests/test_snapshot.py tests/test_presence.py tests/test_client.py \
  tests/test_accounts.py tests/test_projects.py
# Three pytest workers (pytest-xdist), each taking whole files: most tests wait on
# sockets, subprocesses and the browser, so on two cores three workers finish sooner
# than two (measured: 268 s against 313 s for the main pass). `make test PARALLEL=`
# runs them in one process.
PARALLEL ?= -n 3 --dist loadfile

test: $(VENV)/.installed-test $(VENV)/node/.installed $(VENV)/caldav-suite/.installed system-deps
	$(BIN)/python -m pytest $(PARALLEL) $(PYTEST_ARGS)
	@if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && command -v redis-server >/dev/null; then \
	  echo "make: the protocol suites again, on two nodes (PostgreSQL log, Redis bus)"; \
	  BAROSYNC_TEST_CLUSTER=1 $(BIN)/python -m pytest $(PARALLEL) $(CLUSTER_CONFORMANCE) $(PYTEST_ARGS); \
	else echo "make: PostgreSQL or Redis is missing (as root: apt-get install postgresql redis-server); the cluster conformance run is skipped"; fi

# The edit-test loop: no subprocess storms, no browser, no PostgreSQL or Redis
# (pytest markers; pyproject.toml lists them).
test-quick: $(VENV)/.installed-test
	$(BIN)/python -m pytest $(PARALLEL) -m "not slow and not browser and not cluster" $(PYTEST_ARGS)

# TypeScript, to check barosync.d.ts against the browser client, React 18 (its UMD
# build), to run the hook of docs/web-client.md (tests/test_web_client.py),
# oidc-provider, the real OpenID provider tests/test_oidc.py signs in with, and
# axe-core, the accessibility checks of tests/test_web_a11y.py; ws, the bench's Node
# peer (bench/peers/ws_peer.cjs), which the bench smoke test runs.
NODE_TEST_PACKAGES := typescript@5 react@18 react-dom@18 oidc-provider@9.13.3 axe-core@4.11.4 ws@8.23.1
$(VENV)/node/.installed: Makefile | $(BIN)/python
	@if command -v npm >/dev/null; then \
	  echo "make: installing $(NODE_TEST_PACKAGES) into $(VENV)/node for the browser-client and OpenID checks"; \
	  npm install --prefix $(VENV)/node --no-audit --no-fund --silent $(NODE_TEST_PACKAGES) && touch $@; \
	else echo "make: npm is missing (apt-get install npm); the TypeScript and OpenID checks will skip"; fi

# python-caldav's own functional suite, which tests/test_caldav_suite.py runs against
# barosync: the pinned sdist's tests, in a venv of their own (the suite's pytest-asyncio
# set-up is not ours), with what its test modules import.
CALDAV_SUITE := caldav==3.6.0
CALDAV_SUITE_DEPS := pytest pyyaml tzlocal pytest-asyncio proxy.py vobject pyfakefs
$(VENV)/caldav-suite/.installed: Makefile | $(BIN)/python
	@echo "make: fetching python-caldav's test suite ($(CALDAV_SUITE)) into $(VENV)/caldav-suite"
	rm -rf $(VENV)/caldav-suite
	$(PYTHON) -m venv $(VENV)/caldav-suite/venv
	$(VENV)/caldav-suite/venv/bin/python -m pip install --quiet $(CALDAV_SUITE) $(CALDAV_SUITE_DEPS)
	$(VENV)/caldav-suite/venv/bin/python -m pip download --quiet --no-binary :all: --no-deps -d $(VENV)/caldav-suite $(CALDAV_SUITE)
	tar -xzf $(VENV)/caldav-suite/caldav-*.tar.gz -C $(VENV)/caldav-suite
	touch $@

# Debian packages the tests use: PostgreSQL and Redis for the cluster tests (started
# by the fixtures in temp dirs on free ports, never as system services; Debian's
# postinst may start its own, which the tests leave alone), Chromium for the browser tests
# (Playwright drives /usr/bin/chromium) and libfaketime (a server a week ahead). Installed when missing and we are root;
# otherwise those tests skip and say why.
.PHONY: system-deps
system-deps:
	@missing=""; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "make: installing Debian's$$missing for the cluster tests"; \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	  else \
	    echo "make:$$missing missing (as root: apt-get install$$missing); the cluster tests will skip"; \
	  fi; \
	fi
	@missing=""; \
	[ -x /usr/bin/chromium ] || missing="$$missing chromium"; \
	ls /usr/lib/*/faketime/libfaketimeMT.so.1 >/dev/null 2>&1 || missing="$$missing faketime"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "make: installing Debian's$$missing for the browser tests"; \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	  else \
	    echo "make:$$missing missing (as root: apt-get install$$missing); the browser tests skip what needs it"; \
	  fi; \
	fi

bench: $(VENV)/.installed-test $(VENV)/node/.installed $(VENV)/node/.installed-bench
	$(BIN)/python bench/run.py $(ARGS)

# The Node peer's durable mode stores in SQLite through better-sqlite3, which npm
# builds from source here (about a minute): only the bench needs it.
$(VENV)/node/.installed-bench: | $(VENV)/node/.installed
	@if command -v npm >/dev/null; then \
	  echo "make: installing better-sqlite3@12 into $(VENV)/node for the bench's durable Node peer (compiles, ~1 min)"; \
	  npm install --prefix $(VENV)/node --no-audit --no-fund --silent better-sqlite3@12 && touch $@; \
	else echo "make: npm is missing: the bench's Node peer is skipped (as root: apt-get install nodejs npm)"; fi

# Steady mixed load for 60 minutes (ARGS="--minutes 10" for less), watching RSS,
# descriptors, the data file and latency; not part of `make test`.
soak: $(VENV)/.installed-test
	$(BIN)/python bench/soak.py $(ARGS)

# The single-file binary dist/barosync, built by PyInstaller in a build-only venv
# (build/venv: runtime dependencies + PyInstaller, no test tools); prints its size.
.PHONY: binary test-binary
binary:
	$(PYTHON) packaging/build.py

# Builds the binary, then runs it for real (serve, WebSocket clients, a plugin, SIGTERM).
test-binary: binary $(VENV)/.installed-test
	BAROSYNC_BINARY=$(CURDIR)/dist/barosync $(BIN)/python -m pytest tests/test_binary.py $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build dist *.egg-info

# Third-party browser code, vendored from the npm registry with its version and license
# (no build step, no CDN at run time): FullCalendar's MIT standard bundle, and its rrule
# plugin with the rrule library it drives (recurring events).
FULLCALENDAR_VERSION := 6.1.22
# The newest @fullcalendar/rrule release; it runs on the 6.1.22 core.
FULLCALENDAR_RRULE_VERSION := 6.1.21
RRULE_VERSION := 2.8.1
# The QR code of the "Calendar apps" dialog: no dependencies, an ES module.
QRCODE_GENERATOR_VERSION := 2.0.4
VENDOR := barosync/web/app/vendor
.PHONY: vendor
vendor:
	@command -v npm >/dev/null || { echo "make vendor: npm is missing (apt-get install npm)"; exit 1; }
	rm -rf build/vendor && mkdir -p build/vendor $(VENDOR)/fullcalendar
	cd build/vendor && npm pack --silent fullcalendar@$(FULLCALENDAR_VERSION) && tar xzf fullcalendar-$(FULLCALENDAR_VERSION).tgz
	cp build/vendor/package/index.global.min.js build/vendor/package/LICENSE.md $(VENDOR)/fullcalendar/
	echo "fullcalendar $(FULLCALENDAR_VERSION) (npm), MIT: index.global.min.js is the standard bundle (daygrid, timegrid, list, multimonth, interaction)" > $(VENDOR)/fullcalendar/VERSION.txt
	mkdir -p $(VENDOR)/fullcalendar-rrule $(VENDOR)/rrule build/vendor/fcrrule build/vendor/rrule
	cd build/vendor && npm pack --silent @fullcalendar/rrule@$(FULLCALENDAR_RRULE_VERSION) rrule@$(RRULE_VERSION) \
	  && tar xzf fullcalendar-rrule-$(FULLCALENDAR_RRULE_VERSION).tgz -C fcrrule && tar xzf rrule-$(RRULE_VERSION).tgz -C rrule
	cp build/vendor/fcrrule/package/index.global.min.js build/vendor/fcrrule/package/LICENSE.md $(VENDOR)/fullcalendar-rrule/
	echo "@fullcalendar/rrule $(FULLCALENDAR_RRULE_VERSION) (npm), MIT: index.global.min.js, the global build (needs rrule.js loaded first)" > $(VENDOR)/fullcalendar-rrule/VERSION.txt
	cp build/vendor/rrule/package/dist/es5/rrule.min.js build/vendor/rrule/package/LICENCE $(VENDOR)/rrule/
	echo "rrule $(RRULE_VERSION) (npm), BSD-3-Clause: dist/es5/rrule.min.js, the UMD build (window.rrule)" > $(VENDOR)/rrule/VERSION.txt
	mkdir -p $(VENDOR)/qrcode-generator build/vendor/qrcode
	cd build/vendor && npm pack --silent qrcode-generator@$(QRCODE_GENERATOR_VERSION) \
	  && tar xzf qrcode-generator-$(QRCODE_GENERATOR_VERSION).tgz -C qrcode
	cp build/vendor/qrcode/package/dist/qrcode.mjs build/vendor/qrcode/package/package.json $(VENDOR)/qrcode-generator/
	echo "qrcode-generator $(QRCODE_GENERATOR_VERSION) (npm), MIT (the license is the header of qrcode.mjs and package.json's license field; the package ships no LICENSE file): dist/qrcode.mjs, the ES module" > $(VENDOR)/qrcode-generator/VERSION.txt
	@echo "vendored fullcalendar $(FULLCALENDAR_VERSION), rrule $(RRULE_VERSION) and qrcode-generator $(QRCODE_GENERATOR_VERSION) into $(VENDOR)"
