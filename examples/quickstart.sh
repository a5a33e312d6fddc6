#!/usr/bin/env bash
# imapgate in one command, on a fresh Debian or Ubuntu machine:
#
#   examples/quickstart.sh                 build imapgate, start a private Dovecot, run imapgate
#   examples/quickstart.sh --dovecot-only  just the private Dovecot, until Ctrl-C
#
# What it does:
#   1. installs Dovecot (apt-get install dovecot-imapd, with sudo when not root) if missing;
#      Rust must be there already (https://rustup.rs);
#   2. cargo build --release;
#   3. starts a private Dovecot (config: examples/dovecot.conf, the template the tests use)
#      on 127.0.0.1:10143, plain IMAP, users alice/alicepw and bob/bobpw; its files (log,
#      Maildirs, config) are reachable as ./run/dovecot;
#   4. runs target/release/imapgate run --config examples/imapgate.toml (listeners 1993 with
#      implicit TLS and 1143 with STARTTLS, a self-signed certificate made at start);
#   5. stops Dovecot when imapgate ends (Ctrl-C).
#
# Environment: IMAPGATE_CONFIG (default examples/imapgate.toml), DOVECOT_PORT (default 10143;
# must match the config's upstream).
set -euo pipefail

cd "$(dirname "$0")/.."
REPO=$PWD
CONFIG=${IMAPGATE_CONFIG:-examples/imapgate.toml}
PORT=${DOVECOT_PORT:-10143}
MODE=${1:-}
export PATH="$PATH:/usr/sbin:/sbin"

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() {
    printf 'quickstart: %s\n' "$*" >&2
    exit 1
}

case "$MODE" in
"" | --dovecot-only) ;;
*) die "usage: $0 [--dovecot-only]" ;;
esac

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || SUDO_MISSING=1
    SUDO="sudo"
fi

# --- 1. what must be installed ---------------------------------------------------------------
if ! command -v dovecot >/dev/null 2>&1; then
    [ -z "${SUDO_MISSING:-}" ] || die "dovecot is missing and sudo is not available: run as root"
    command -v apt-get >/dev/null 2>&1 ||
        die "dovecot is missing; install Dovecot 2.3 (package dovecot-imapd) and run again"
    say "installing Dovecot (dovecot-imapd)"
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q dovecot-imapd
    # The package starts a system Dovecot on 143/993 where there is an init system; the
    # quickstart does not need it.
    if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
        $SUDO systemctl disable --now dovecot >/dev/null 2>&1 || true
    else
        $SUDO dovecot stop >/dev/null 2>&1 || true
    fi
fi
if [ -z "$MODE" ] && ! command -v cargo >/dev/null 2>&1; then
    [ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
    command -v cargo >/dev/null 2>&1 ||
        die "cargo not found: install Rust with rustup (https://rustup.rs), then run again"
fi

# --- 2. build ----------------------------------------------------------------------------------
if [ -z "$MODE" ]; then
    say "building imapgate (cargo build --release)"
    cargo build --release
    [ -f "$CONFIG" ] || die "no config at $CONFIG"
fi

# --- 3. a private Dovecot --------------------------------------------------------------------
# Its folder lives under /tmp: Dovecot's sockets need a short path (~100 bytes at most), and
# as root its mail and auth processes run as unprivileged users who may not be allowed into
# this checkout (e.g. under /root). ./run/dovecot points to it.
DIR=/tmp/imapgate-quickstart-$(id -u)
if [ -e "$DIR" ] && [ ! -O "$DIR" ]; then
    die "$DIR exists and is not yours"
fi
if [ -f "$DIR/run/master.pid" ] && kill -0 "$(cat "$DIR/run/master.pid")" 2>/dev/null; then
    say "stopping the Dovecot of a previous quickstart"
    dovecot -c "$DIR/dovecot.conf" stop 2>/dev/null || true
    sleep 1
fi
mkdir -p "$DIR/state" "$DIR/mail"
chmod 755 "$DIR" "$DIR/state" "$DIR/mail"
mkdir -p "$REPO/run"
ln -sfn "$DIR" "$REPO/run/dovecot"

if [ "$(id -u)" -eq 0 ]; then
    MAIL_USER=imapgate-test # the same unprivileged mail user as the tests
    id -u "$MAIL_USER" >/dev/null 2>&1 ||
        useradd --system --no-create-home --shell /usr/sbin/nologin "$MAIL_USER"
    MAIL_UID=$(id -u "$MAIL_USER")
    MAIL_GID=$(id -g "$MAIL_USER")
    chown "$MAIL_UID:$MAIL_GID" "$DIR/mail"
    LOGIN_USER=dovenull INTERNAL_USER=dovecot INTERNAL_GROUP=dovecot
else
    MAIL_UID=$(id -u) MAIL_GID=$(id -g)
    LOGIN_USER=$(id -un) INTERNAL_USER=$(id -un) INTERNAL_GROUP=$(id -gn)
fi
printf 'alice:alicepw\nbob:bobpw\n' >"$DIR/passwd"
chmod 644 "$DIR/passwd"

sed -e "s|@ROOT@|$DIR|g" \
    -e "s|@BASE_DIR@|$DIR/run|g" \
    -e "s|@INSTANCE_NAME@|imapgate-quickstart|g" \
    -e "s|@IMAP_PORT@|$PORT|g" \
    -e "s|@IMAPS_PORT@|0|g" \
    -e "s|@SSL@|no|g" \
    -e "s|@SSL_FILES@||g" \
    -e "s|@LOGIN_USER@|$LOGIN_USER|g" \
    -e "s|@INTERNAL_USER@|$INTERNAL_USER|g" \
    -e "s|@INTERNAL_GROUP@|$INTERNAL_GROUP|g" \
    -e "s|@MAIL_UID@|$MAIL_UID|g" \
    -e "s|@MAIL_GID@|$MAIL_GID|g" \
    -e "s|@SEPARATOR@|/|g" \
    -e "s|@PREFIX@||g" \
    -e "s|@IMAP_PLUGINS@||g" \
    examples/dovecot.conf >"$DIR/dovecot.conf"
if grep -v '^[[:space:]]*#' "$DIR/dovecot.conf" | grep -q '@[A-Z_]*@'; then
    die "unfilled placeholder in $DIR/dovecot.conf"
fi

say "starting Dovecot on 127.0.0.1:$PORT (log: run/dovecot/dovecot.log)"
# Its own session and process group: Ctrl-C reaches imapgate, and the trap below stops every
# Dovecot process at once (the master alone leaves running sessions behind for seconds).
setsid dovecot -F -c "$DIR/dovecot.conf" </dev/null >>"$DIR/dovecot.log" 2>&1 &
LAUNCHER=$!
PGID=""

stop_dovecot() {
    local pgid=$PGID n=0
    [ -n "$pgid" ] || pgid=$(cat "$DIR/run/master.pid" 2>/dev/null || true)
    [ -n "$pgid" ] || return 0
    kill -TERM -- "-$pgid" 2>/dev/null || return 0
    while kill -0 -- "-$pgid" 2>/dev/null && [ $n -lt 20 ]; do
        sleep 0.1
        n=$((n + 1))
    done
    kill -KILL -- "-$pgid" 2>/dev/null || true
    say "Dovecot stopped"
}
trap stop_dovecot EXIT
trap 'exit 130' INT
trap 'exit 143' TERM HUP

greeting=""
for _ in $(seq 1 100); do
    if ! kill -0 "$LAUNCHER" 2>/dev/null; then
        tail -n 20 "$DIR/dovecot.log" >&2
        die "Dovecot exited; its log is above"
    fi
    greeting=$(
        exec 2>/dev/null
        exec 3<>"/dev/tcp/127.0.0.1/$PORT" || exit 0
        read -r -t 2 line <&3 || true
        printf 'z LOGOUT\r\n' >&3 || true
        printf '%s' "${line:-}"
    ) || true
    case "$greeting" in "* OK"*) break ;; esac
    sleep 0.1
done
case "$greeting" in
"* OK"*) ;;
*)
    tail -n 20 "$DIR/dovecot.log" >&2
    die "Dovecot did not greet on 127.0.0.1:$PORT within 10 s"
    ;;
esac
PGID=$(cat "$DIR/run/master.pid")

if [ "$MODE" = --dovecot-only ]; then
    say "Dovecot ready on 127.0.0.1:$PORT (plain IMAP; alice/alicepw, bob/bobpw). Ctrl-C stops it."
    wait "$LAUNCHER" || true
    exit 0
fi

# --- 4. imapgate ------------------------------------------------------------------------------
cat >&2 <<EOT

imapgate is starting in front of Dovecot (upstream 127.0.0.1:$PORT, plain).
  implicit TLS  127.0.0.1:1993    openssl s_client -connect 127.0.0.1:1993 -alpn imap
  STARTTLS      127.0.0.1:1143    openssl s_client -connect 127.0.0.1:1143 -starttls imap
  a real client:                  curl --insecure imaps://127.0.0.1:1993/ -u alice:alicepw
  users: alice/alicepw, bob/bobpw. The certificate is self-signed (hence -k / --insecure).
  policies: require_tls (no login before TLS), namespace (clients see INBOX.x.y for the
            server's x/y), search_rate_limit (5 SEARCHes in a burst, then 1/s per user).
  metrics:  curl http://127.0.0.1:9143/metrics    health: curl http://127.0.0.1:9143/healthz
  Ctrl-C stops imapgate and Dovecot.

EOT
status=0
target/release/imapgate run --config "$CONFIG" || status=$?
exit "$status"
