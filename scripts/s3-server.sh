# A local S3-compatible server (moto's server mode) for the artifact store tests: installed
# into a virtualenv outside the clone from the pinned scripts/moto-requirements.txt, started on
# a free loopback port, its URL exported as EMP_TEST_S3_ENDPOINT. Sourced by scripts/test
# (after scripts/lib.sh), not run.
#
# start_test_s3 starts it (and arranges nothing else); stop_test_s3 stops it. Knob:
# EMP_MOTO_VENV (default ~/.cache/emp-venvs/moto).

emp_moto_pid=""

start_test_s3() {
  local requirements venv stamp wanted python port
  requirements="$PWD/scripts/moto-requirements.txt"
  venv="${EMP_MOTO_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/emp-venvs/moto}"
  stamp="$venv/.requirements.sha256"
  wanted="$(sha256sum "$requirements" | cut -d' ' -f1)"
  if [ ! -x "$venv/bin/moto_server" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
    python="$(command -v python3.11 || command -v python3)"
    say "installing moto into $venv (with $python)"
    rm -rf "$venv"
    "$python" -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check -r "$requirements"
    echo "$wanted" >"$stamp"
  fi
  port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
  "$venv/bin/moto_server" -H 127.0.0.1 -p "$port" >"${TMPDIR:-/tmp}/emp-moto-$port.log" 2>&1 &
  emp_moto_pid=$!
  for _ in $(seq 1 150); do
    if curl -fsS "http://127.0.0.1:$port/moto-api/" >/dev/null 2>&1; then
      export EMP_TEST_S3_ENDPOINT="http://127.0.0.1:$port"
      say "S3-compatible test server (moto) on $EMP_TEST_S3_ENDPOINT"
      return 0
    fi
    kill -0 "$emp_moto_pid" 2>/dev/null || break
    sleep 0.2
  done
  say "moto did not start; its log:"
  tail -n 20 "${TMPDIR:-/tmp}/emp-moto-$port.log" >&2 || true
  return 1
}

stop_test_s3() {
  if [ -n "$emp_moto_pid" ]; then
    kill "$emp_moto_pid" 2>/dev/null || true
    wait "$emp_moto_pid" 2>/dev/null || true
    emp_moto_pid=""
  fi
}
