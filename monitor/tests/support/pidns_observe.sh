#!/usr/bin/env bash
# Runs inside `unshare --pid --fork --mount-proc`: leakwatch and a socket child share a pid namespace of
# their own, as in a pod with shareProcessNamespace. Usage: pidns_observe.sh LEAKWATCH CHILD_SCRIPT DIR N M K
set -euo pipefail
lw=$1 script=$2 dir=$3 n=$4 m=$5 k=$6
mkfifo "$dir/go"
python3 "$script" "$n" "$m" "$k" 0 < "$dir/go" > "$dir/child.out" &
child=$!
exec 7> "$dir/go"
# Slow machines (emulated kernels, LEAKWATCH_TEST_TIME_SCALE) get a longer window and a longer wait.
scale=${LEAKWATCH_TEST_TIME_SCALE:-1}
"$lw" observe --pid "$child" --interval 300ms --count $((12 * scale)) --json > "$dir/observe.jsonl" 2> "$dir/observe.err" &
lw_pid=$!
# Start the child's sockets only once the probes are attached.
for _ in $(seq $((100 * scale))); do grep -q '^mode:' "$dir/observe.jsonl" 2>/dev/null && break; sleep 0.05; done
echo go >&7
wait "$lw_pid"
echo "$child" > "$dir/child.pid"
echo end >&7
wait "$child" || true
