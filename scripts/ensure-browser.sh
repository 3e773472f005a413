#!/usr/bin/env bash
# Make sure the console's browser test can run: Debian's Chromium (/usr/bin/chromium, with
# chromium-driver) and playwright-core in tests/browser/node_modules (it drives that Chromium
# and never downloads a browser of its own).
# - present: nothing to do
# - missing: as root on Debian/Ubuntu, install chromium, chromium-driver (and nodejs/npm if
#   absent) with apt-get, and `npm ci` in tests/browser; otherwise explain how to get them.
set -euo pipefail
cd "$(dirname "$0")/.."

root_apt() { [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; }
apt_install() {
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

missing=()
[ -x /usr/bin/chromium ] || missing+=(chromium chromium-driver)
command -v node >/dev/null 2>&1 || missing+=(nodejs)
command -v npm >/dev/null 2>&1 || missing+=(npm)
if [ ${#missing[@]} -gt 0 ]; then
  if root_apt; then
    echo "browser: installing ${missing[*]} from Debian via apt-get (the console's browser test drives headless Chromium)"
    apt_install "${missing[@]}"
  else
    cat >&2 <<MSG
browser: the console's browser test needs ${missing[*]}.
  Debian/Ubuntu:  sudo apt-get install chromium chromium-driver nodejs npm   (then run this again)
MSG
    exit 1
  fi
fi

if [ ! -d tests/browser/node_modules/playwright-core ]; then
  echo "browser: installing playwright-core into tests/browser/node_modules (npm ci; no browser download)"
  PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --prefix tests/browser --no-audit --no-fund --loglevel=error
fi
echo "browser: $(/usr/bin/chromium --version 2>/dev/null | head -1), playwright-core $(node -p 'require("./tests/browser/node_modules/playwright-core/package.json").version')"
