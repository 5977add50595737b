#!/usr/bin/env bash
# Chromium and its driver (Debian's packages) for the chat-page test in tests/test_serve.py, installed when they
# are missing and apt-get can run (as root). Never fails: without a browser that one test skips, saying why.
set -u
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "browser: installing chromium and chromium-driver with apt-get"
  if apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
       chromium chromium-driver; then
    exit 0
  fi
fi
echo "browser: no chromium with chromedriver; tests/test_serve.py's browser test will skip"
exit 0
