# The two commands an operator needs: `make demo` and `make test`.
# Both install what they need first (scripts/setup.sh is idempotent).
.PHONY: setup demo test test-unit bench image torture clean

VENV := .venv/bin

setup:
	@./scripts/setup.sh

image: setup
	$(VENV)/geomirror guest build

demo: setup
	$(VENV)/geomirror demo

test: setup
	@$(VENV)/python -m pytest -q tests ; rc=$$? ; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

test-unit: setup
	$(VENV)/python -m pytest -q tests -m 'not lab'

bench: setup
	$(VENV)/python bench/codec.py
	$(VENV)/python bench/checkpoint.py

clean:
	rm -rf .venv build *.egg-info .pytest_cache .hypothesis
