# Sourced by scripts/demo and scripts/test: create .venv if missing and install the
# package (editable) with the extras in $SHARDOPT_EXTRAS (default: test) when
# pyproject.toml changed since the last install of those extras. pip's output goes
# to .venv/pip.log, shown only when the install fails; one line says what happens.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
python=${PYTHON:-python3}
extras=${SHARDOPT_EXTRAS:-test}
stamp=".venv/.shardopt-installed-${extras//,/-}"
log=.venv/pip.log
if [ ! -x .venv/bin/python ] || [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  started=$SECONDS
  printf 'Setting up .venv: installing shardopt[%s] and its dependencies (pip log: %s) ...' \
    "$extras" "$log" >&2
  if [ ! -x .venv/bin/python ] && ! "$python" -m venv .venv; then
    printf '\n%s -m venv .venv failed (is the venv module installed?)\n' "$python" >&2
    exit 1
  fi
  if ! {
    .venv/bin/python -m pip install --upgrade pip &&
      .venv/bin/python -m pip install -e ".[$extras]"
  } >"$log" 2>&1; then
    printf ' failed. The end of %s:\n' "$log" >&2
    tail -n 40 "$log" >&2
    exit 1
  fi
  touch "$stamp"
  printf ' done (%d s)\n' $((SECONDS - started)) >&2
fi
export PATH="$root/.venv/bin:$PATH"
