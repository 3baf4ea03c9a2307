# Python clients that are not ours (testenv/python-clients.txt: the openai
# package), sourced by testenv/up.sh: a venv in the tools cache, keyed by
# the requirements' digest, installed from PyPI once.
# shellcheck shell=bash

python_clients_venv() {
  local digest
  digest=$(sha1sum "$TESTENV_DIR/python-clients.txt" | cut -c1-12)
  printf '%s/python-clients-%s' "$TOOLS" "$digest"
}

prepare_python_clients() {
  local venv
  venv=$(python_clients_venv)
  [[ -f $venv/.complete ]] && return 0
  log "installing the Python clients the tests use (testenv/python-clients.txt)"
  rm -rf "$venv"
  python3 -m venv "$venv" >"$LOGS/python-clients.log" 2>&1 \
    || die "python3 -m venv failed (needs python3-venv); see $LOGS/python-clients.log"
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$TESTENV_DIR/python-clients.txt" \
    >>"$LOGS/python-clients.log" 2>&1 || die "pip install failed; see $LOGS/python-clients.log"
  touch "$venv/.complete"
}
