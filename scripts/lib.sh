# Shared by scripts/up and scripts/test: make sure PostgreSQL and Redis run on this machine,
# installing them from Debian's packages when they are absent. Sourced, not run.

EMP_PG_URL_BASE="${EMP_PG_URL_BASE:-postgres://postgres@127.0.0.1:5432}"
EMP_REDIS_URL="${EMP_REDIS_URL:-redis://127.0.0.1:6379}"

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

apt_install() {
  say "installing $* with apt"
  export DEBIAN_FRONTEND=noninteractive
  if [ -z "${EMP_APT_UPDATED:-}" ]; then
    apt-get update -qq
    EMP_APT_UPDATED=1
  fi
  apt-get install -y -qq "$@" >/dev/null
}

pg_answers() { pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; }

ensure_postgres() {
  if ! command -v pg_ctlcluster >/dev/null 2>&1 || ! command -v psql >/dev/null 2>&1; then
    apt_install postgresql postgresql-client
  fi
  if ! pg_answers; then
    local version
    version="$(ls /etc/postgresql | sort -V | tail -n 1)"
    if [ -z "$version" ]; then
      say "no PostgreSQL cluster found"; return 1
    fi
    say "starting PostgreSQL $version"
    pg_ctlcluster --skip-systemctl-redirect "$version" main start
    for _ in $(seq 1 50); do pg_answers && break; sleep 0.2; done
  fi
  # A fresh Debian cluster asks for passwords over TCP; this local setup connects as the
  # postgres role without one, so trust loopback connections (development machines only).
  if ! psql "$EMP_PG_URL_BASE/postgres" -qAtc 'select 1' >/dev/null 2>&1; then
    local hba
    hba="$(su postgres -c "psql -qAtc 'show hba_file'" 2>/dev/null || true)"
    if [ -n "$hba" ] && [ -w "$hba" ]; then
      say "allowing password-less loopback connections in $hba"
      sed -i '/^# emp-local-trust/,+2d' "$hba"
      sed -i '1i # emp-local-trust\nhost all all 127.0.0.1/32 trust\nhost all all ::1/128 trust' "$hba"
      su postgres -c "psql -qAtc 'select pg_reload_conf()'" >/dev/null
    fi
  fi
  psql "$EMP_PG_URL_BASE/postgres" -qAtc 'select 1' >/dev/null
}

ensure_database() {
  local name="$1"
  if ! psql "$EMP_PG_URL_BASE/postgres" -qAtc "select 1 from pg_database where datname = '$name'" | grep -q 1; then
    say "creating database $name"
    psql "$EMP_PG_URL_BASE/postgres" -qc "create database \"$name\""
  fi
}

ensure_redis() {
  if ! command -v redis-server >/dev/null 2>&1; then
    apt_install redis-server redis-tools
  fi
  if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
    say "starting Redis on 127.0.0.1:6379"
    mkdir -p /var/lib/redis /var/log/redis
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
      --dir /var/lib/redis --logfile /var/log/redis/emp.log
    for _ in $(seq 1 50); do redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 && break; sleep 0.1; done
  fi
  redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null
}

# Headless Chromium and its WebDriver, for the dashboard's browser test.
ensure_chromium() {
  if ! command -v chromedriver >/dev/null 2>&1 || ! command -v chromium >/dev/null 2>&1; then
    apt_install chromium chromium-driver
  fi
}

# A build cache outside the clone, so a fresh clone does not rebuild the world.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/emp-target}"
