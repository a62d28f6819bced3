# Convenience targets; the README's two commands are scripts/demo and scripts/test.
.PHONY: setup demo test test-unit test-kernel bench test-vm lint
setup:
	scripts/setup.sh
demo:
	scripts/demo
test:
	scripts/test
test-unit: setup
	.venv/bin/python -m pytest -q tests/unit
test-kernel: setup
	.venv/bin/python -m pytest -q -m 'kernel and not fn_probes and not host_guests'
# the test-kernel tier: Debian 13 (6.12) and 12 (6.1) guests under QEMU, every
# backend their kernels offer (tests/vm/README.md); ARGS="--guests trixie ..."
test-vm:
	tests/vm/deps.sh
	python3 tests/vm/run.py $(ARGS)
# benchmarks, as root (the ksmd one drives KSM and BPF, holding the kernel-test
# lock): prints the table, writes bench/RESULTS.md; ARGS="--quick" for a smoke run
bench: setup
	.venv/bin/python bench/run.py $(ARGS)
lint: setup
	.venv/bin/ruff check ksmtrace tests
