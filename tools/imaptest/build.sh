#!/usr/bin/env bash
# Builds Dovecot's imaptest from the tarball next to this script (MIT licence: see COPYING,
# COPYING.MIT and AUTHORS here; the public dovecot/imaptest repository at commit 924f619, the
# last one that builds against Debian 12's Dovecot 2.3 headers, plus a one-line API fix) and
# installs a wrapper command `imaptest`.
#
#   tools/imaptest/build.sh                 # from the repository; about a minute on 2 cores
#   ../shared/tools/imaptest/build.sh       # the same script elsewhere: it finds its tarball
#   imaptest host=127.0.0.1 port=PORT user=U pass=P test=tests   # the 71 compliance test groups
#
# `test=tests` is resolved relative to the build's src/ folder (the wrapper runs there).
# Compliance reference: against Dovecot 2.3.19 directly, "71 test groups: 0 failed".
#
# Environment: IMAPTEST_DIR (build folder, default /opt/imaptest), IMAPTEST_BIN (the wrapper,
# default /usr/local/bin/imaptest). Build dependencies (dovecot-dev, autotools, a C compiler)
# are installed with apt-get when missing (with sudo when not root). No stdin is read.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
TARBALL="$HERE/imaptest-924f619.tar.gz"
DEST=${IMAPTEST_DIR:-/opt/imaptest}
BIN=${IMAPTEST_BIN:-/usr/local/bin/imaptest}
export DEBIAN_FRONTEND=noninteractive

[ -f "$TARBALL" ] || { echo "build.sh: $TARBALL is missing" >&2; exit 1; }
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

need=()
for p in dovecot-dev autoconf automake libtool pkgconf make gcc; do
  dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
done
if ((${#need[@]})); then
  echo "build.sh: installing ${need[*]}" >&2
  # .ci/run passes APT_UPDATED=1 when it has just updated the package lists.
  [ -n "${APT_UPDATED:-}" ] || $SUDO apt-get update -q </dev/null
  $SUDO apt-get install -y -q --no-install-recommends "${need[@]}" </dev/null
fi

$SUDO rm -rf "$DEST"
$SUDO mkdir -p "$DEST"
$SUDO chown "$(id -u):$(id -g)" "$DEST"
tar -xzf "$TARBALL" -C "$DEST" --strip-components=1
cd "$DEST"
echo "0.0.0-924f619" >version   # configure reads the version from git or this file
# Dovecot 2.3.19's imap_parser_create() takes a fourth argument (parser params).
sed -i 's/imap_parser_create(\(.*\), (size_t)-1)/imap_parser_create(\1, (size_t)-1, NULL)/' src/*.c
./autogen.sh >build.log 2>&1 || { tail -20 build.log; exit 1; }
./configure --with-dovecot=/usr/lib/dovecot >>build.log 2>&1 || { tail -20 build.log; exit 1; }
make -j"$(nproc)" >>build.log 2>&1 || { tail -20 build.log; exit 1; }

wrapper=$(mktemp)
cat >"$wrapper" <<WRAP
#!/bin/sh
cd "$DEST/src" && LD_LIBRARY_PATH=/usr/lib/dovecot exec ./imaptest "\$@"
WRAP
$SUDO mkdir -p "$(dirname "$BIN")"
$SUDO install -m 0755 "$wrapper" "$BIN"
rm -f "$wrapper"
echo "imaptest built in $DEST; run: $BIN host=127.0.0.1 port=PORT user=U pass=P test=tests"
