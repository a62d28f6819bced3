# Convenience targets; the README's two commands are scripts/demo and scripts/test.
.PHONY: setup demo test test-unit test-kernel lint
setup:
	scripts/setup.sh
demo:
	scripts/demo
test:
	scripts/test
test-unit: setup
	.venv/bin/python -m pytest -q tests/unit
test-kernel: setup
	.venv/bin/python -m pytest -q -m kernel
lint: setup
	.venv/bin/ruff check ksmtrace tests
