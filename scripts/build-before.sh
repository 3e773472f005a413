#!/usr/bin/env bash
# Build the release binary of an earlier revision, for `make bench` to compare against in the
# same run (BENCH_BEFORE_BIN). Usage: scripts/build-before.sh REV OUT
# The revision is checked out in a temporary git worktree and built with the shared target
# directory, so only the crate itself is compiled again.
set -euo pipefail
REV=${1:?revision}
OUT=${2:?output path}
if [ -x "$OUT" ] && [ "$(cat "$OUT.rev" 2>/dev/null)" = "$REV" ]; then
  echo "bench: $OUT is already the build of $REV"
  exit 0
fi
if ! git rev-parse --verify -q "$REV^{commit}" >/dev/null; then
  echo "bench: revision $REV is not in this clone; skipping the before/after comparison" >&2
  exit 0
fi
WT=$(mktemp -d)
trap 'git worktree remove --force "$WT" >/dev/null 2>&1 || rm -rf "$WT"' EXIT
git worktree add --detach "$WT" "$REV" >/dev/null
CARGO_TARGET_DIR="$PWD/target/before" cargo build --release --quiet --manifest-path "$WT/Cargo.toml"
mkdir -p "$(dirname "$OUT")"
cp "$PWD/target/before/release/session-worker" "$OUT"
echo "$REV" > "$OUT.rev"
echo "bench: built $REV as $OUT"
