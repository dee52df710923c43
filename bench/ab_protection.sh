#!/bin/bash
# Same-sitting A/B of bench/protection.py (issue 11's CPU per heartbeat), alternating sides.
#   bench/ab_protection.sh BASE [PAIRS]
# A is BASE (a commit) checked out in a scratch worktree; B is this checkout. Both run
# THIS checkout's bench/protection.py, each with its own server and client first on
# PYTHONPATH, so only the code under test differs. Output lines start with A<n> or B<n>.
set -euo pipefail
base=${1:?usage: bench/ab_protection.sh BASE [PAIRS]}
pairs=${2:-8}
here=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-$here/.venv/bin/python}
a=$(mktemp -d /tmp/tether-ab-XXXXXX)
trap 'git -C "$here" worktree remove --force "$a" >/dev/null 2>&1 || true' EXIT
git -C "$here" worktree add -q --detach "$a" "$base"
for i in $(seq "$pairs"); do
  (cd "$a" && PYTHONPATH="$a/server:$a/client" "$py" "$here/bench/protection.py" --rounds 100 --trips 0 | sed "s/^/A$i /")
  (cd "$here" && PYTHONPATH="$here/server:$here/client" "$py" bench/protection.py --rounds 100 --trips 0 | sed "s/^/B$i /")
done
