#!/usr/bin/env bash
# Install densegrpo (and, with --plugins, every reward plugin package) into the current Python.
# Versions are pinned by constraints.txt so installs are reproducible.
#   bash scripts/install.sh            core + test tools
#   bash scripts/install.sh --plugins  core + test tools + the wandb extra + plugins/densegrpo-*
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
PIP=("$PY" -m pip install --quiet --disable-pip-version-check -c constraints.txt)

# --plugins also takes the optional integrations (W&B), so their tests run in CI
EXTRAS="dev"
[[ "${1:-}" == "--plugins" ]] && EXTRAS="dev,wandb"
"${PIP[@]}" -e ".[$EXTRAS]"

if [[ "${1:-}" == "--plugins" ]]; then
  # Packages whose own metadata pins what breaks our stack go in with --no-deps (see each plugin's README).
  if [[ -f plugins/no-deps.txt ]]; then
    "${PIP[@]}" --no-deps -r plugins/no-deps.txt
  fi
  for plugin in plugins/densegrpo-*/; do
    [[ -f "$plugin/pyproject.toml" ]] || continue
    "${PIP[@]}" -e "$plugin"
  done
fi
"$PY" -m densegrpo plugins --json > /dev/null
echo "densegrpo installed: $("$PY" -m densegrpo plugins --json | "$PY" -c 'import json,sys; print(len(json.load(sys.stdin)), "components")')"
