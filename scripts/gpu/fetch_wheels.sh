#!/usr/bin/env bash
# Run HERE, where the package registry is reachable, before a session's device calls: the wheels
# that the device machine's Python 3.12 lacks, at the versions `make install` put in .venv, into
# .whl/ (ignored by git; name it in the run's `carry`). The device image already has torch,
# lightning, torchmetrics, numpy, scipy, pandas, scikit-learn, matplotlib and huggingface_hub.
set -euo pipefail
cd "$(dirname "$0")/../.."
test -x .venv/bin/python || { echo "run 'make install' first: versions are read from .venv" >&2; exit 1; }
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qxF '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
rm -rf .whl && mkdir .whl

version() { .venv/bin/python -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }
pins=()
for name in opacus diffusers hydra-core omegaconf dp-accounting dm-tree torch-fidelity mlxtend; do
  pins+=("$name==$(version "$name")")
done
platforms=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_17 manylinux2014 manylinux1; do
  platforms+=(--platform "${tag}_x86_64")
done
.venv/bin/python -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
  --python-version 3.12 --implementation cp "${platforms[@]}" -d .whl "${pins[@]}"
# antlr4-python3-runtime (hydra's parser) is published only as an sdist; it is pure Python.
.venv/bin/python -m pip wheel -q --disable-pip-version-check --no-deps -w .whl \
  "antlr4-python3-runtime==$(version antlr4-python3-runtime)"
ls -1 .whl && du -sh .whl
