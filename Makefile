# duoflow: `make demo` (set-up + train the tiny image generator on CPU + samples), `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	rm -rf runs/image-tiny-demo samples/image-tiny-demo
	WANDB_MODE=offline $(BIN)/python -m app shards synthetic image data/synthetic-image --num 4000 --shard-size 1000
	WANDB_MODE=offline $(BIN)/python -m app fit --config configs/image/tiny.yaml --name image-tiny-demo
	$(BIN)/python -m app sample --ckpt runs/image-tiny-demo/checkpoints/last.ckpt --num 16 --out samples/image-tiny-demo
	@echo "demo done: sample grid at samples/image-tiny-demo/sample-grid.png (training previews in runs/image-tiny-demo/samples/)"

test: $(STAMP)
	WANDB_MODE=offline $(BIN)/python -m pytest -q -ra

test-slow: $(STAMP)
	WANDB_MODE=offline $(BIN)/python -m pytest -q -ra -m slow

clean:
	rm -rf runs samples data/synthetic-image
