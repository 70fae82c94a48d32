# The README's commands. Each target is one script; see scripts/.
.PHONY: demo test bench faults

demo:
	bash scripts/demo.sh

test:
	bash scripts/test.sh

# qt-deps.sh: the GUI benchmark needs Qt's system libraries on a bare machine.
bench:
	bash scripts/engine.sh && bash scripts/venv.sh && bash scripts/qt-deps.sh && \
		bash scripts/base-image.sh && .venv/bin/python bench/run.py

faults:
	bash scripts/faults.sh
