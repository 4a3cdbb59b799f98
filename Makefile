# make demo: set up, convert Fashion-MNIST, train VGG16-BN (the default recipe) briefly, evaluate and predict.
# make test: set up and run the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DATA := data/fashion-mnist
RUN := runs/demo
FASHION_MNIST_DEB := /usr/share/datasets/fashion-mnist
DEMO_ARGS ?= --image-size 32 --epochs 4 --max-per-class 1000 --batch-size 64

.PHONY: setup test demo bench bench-keras accuracy lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

# The web page tests drive Debian's headless chromium (tests/browser.py); installed here when missing.
# One pytest worker per core, one thread each (pytest-xdist; a test file stays on one worker, so its module fixtures
# are built once): 693 s against 1067 s in one process on a 2-core CPU without native bf16 (2026-12-01).
test: setup
	@if [ ! -x /usr/bin/chromedriver ] && command -v apt-get >/dev/null; then \
		SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium chromium-driver; \
	fi
	OMP_NUM_THREADS=1 $(BIN)/pytest -q -n auto --dist loadfile

lint: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

# Debian's dataset-fashion-mnist package holds the real data offline; without apt, `vgg datasets` downloads it.
$(DATA)/.complete: | setup
	@if [ ! -d $(FASHION_MNIST_DEB) ] && command -v apt-get >/dev/null; then \
		SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist; \
	fi
	$(BIN)/vgg datasets fashion-mnist $(DATA)

demo: setup $(DATA)/.complete
	$(BIN)/vgg train $(DATA)/train --out $(RUN) --overwrite $(DEMO_ARGS)
	$(BIN)/vgg evaluate $(RUN)/best.safetensors $(DATA)/test
	$(BIN)/vgg predict $(RUN)/best.safetensors $(DATA)/test/ankle-boot/00000.png $(DATA)/test/trouser/00002.png \
		$(DATA)/test/sneaker/00009.png $(DATA)/test/bag/00018.png --top-k 2
	@echo "curves: $(RUN)/curves.png   history: $(RUN)/history.csv   model: $(RUN)/best.safetensors"

# make bench-keras adds the tutorial's Keras model (TensorFlow, in its own .venv-keras) to the table; make bench
# includes it whenever that environment exists.
KERAS_VENV := .venv-keras
bench: setup
	KERAS_PYTHON=$$([ -x $(KERAS_VENV)/bin/python ] && echo $(KERAS_VENV)/bin/python) \
		$(BIN)/python benchmarks/bench_speed.py

$(KERAS_VENV)/.installed:
	$(PYTHON) -m venv $(KERAS_VENV)
	$(KERAS_VENV)/bin/pip install -q --disable-pip-version-check keras tensorflow-cpu
	touch $@

bench-keras: $(KERAS_VENV)/.installed bench

# Long (about an hour per 10 epochs on 2 CPU cores); run it again after an interruption to resume.
ACCURACY_ARGS ?= --arch vgg16_bn --epochs 30 -- --batch-size 128 --erasing 0.25 --shift 0.0625 --ema 0.998
accuracy: setup $(DATA)/.complete
	$(BIN)/python benchmarks/accuracy.py $(ACCURACY_ARGS)

clean:
	rm -rf $(VENV) $(KERAS_VENV) runs
