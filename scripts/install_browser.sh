#!/usr/bin/env bash
# Installs Debian's chromium and chromium-driver, the browser the chat page's test drives
# (tests/test_serve_page.py), when they are missing and this machine allows it: root, with apt-get.
# Never fails the set-up: without them that test skips, naming what is missing.
# LLAMA_NO_BROWSER=1: do nothing. APT_TIMEOUT: the most seconds one apt-get run may take (300).
set -uo pipefail

PACKAGES=(chromium chromium-driver)
TIMEOUT=${APT_TIMEOUT:-300}

have_browser() {
  command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1
}

if [ -n "${LLAMA_NO_BROWSER:-}" ] || have_browser; then
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "setup: chromium or chromedriver is missing, and installing them needs root and apt-get:" \
       "the browser test will skip (as root on Debian: apt-get install chromium chromium-driver)" >&2
  exit 0
fi

apt_get() {  # quiet, never asking, bounded
  DEBIAN_FRONTEND=noninteractive timeout "$TIMEOUT" apt-get -q -y -o Dpkg::Use-Pty=0 "$@" >/dev/null
}

started=$SECONDS
# A fresh image holds no package lists, and old ones may name files the mirror no longer has:
# read them only when installing without fails.
if ! apt_get install --no-install-recommends "${PACKAGES[@]}" 2>/dev/null; then
  apt_get update && apt_get install --no-install-recommends "${PACKAGES[@]}"
fi
if have_browser; then
  echo "setup: installed ${PACKAGES[*]} with apt-get in $((SECONDS - started)) s"
else
  echo "setup: could not install ${PACKAGES[*]} with apt-get: the browser test will skip" >&2
fi
exit 0
