#!/bin/sh
# tests/reliability/kill_resume.sh: starts rdnet_train, SIGKILLs it shortly after its first
# checkpoint (last.safetensors) appears, then `rdnet_train --resume` that checkpoint must train
# to the last epoch and finish, with the whole history in metrics.csv.
# usage: kill_resume.sh RDNET_TRAIN WORK_DIR TRAIN_ARGS...   (TRAIN_ARGS include --epochs E)
# Not the bit-for-bit resume test: examples/rdnet/train_test.cmake (MODE=resume) checks that.
set -eu
train=$1 dir=$2
shift 2
epochs=$(echo "$@" | sed -n 's/.*--epochs \([0-9]*\).*/\1/p')
rm -rf "$dir"
mkdir -p "$dir"
ckpt=$dir/run/last.safetensors

"$train" "$@" --out "$dir/run" >"$dir/first.log" 2>&1 &
pid=$!
waited=0
while [ ! -e "$ckpt" ]; do
  if ! kill -0 "$pid" 2>/dev/null; then
    echo "kill_resume: rdnet_train exited before writing $ckpt:" >&2
    cat "$dir/first.log" >&2
    exit 1
  fi
  waited=$((waited + 1))
  if [ "$waited" -gt 2400 ]; then  # 2 minutes
    kill -KILL "$pid"
    echo "kill_resume: no checkpoint after 2 minutes:" >&2
    cat "$dir/first.log" >&2
    exit 1
  fi
  sleep 0.05
done
ms=$(($(od -An -N2 -tu2 /dev/urandom) % 300))  # then a moment later: mid-epoch 2, or mid-save
sleep "$(printf '0.%03d' "$ms")"
if ! kill -KILL "$pid" 2>/dev/null; then
  echo "kill_resume: rdnet_train finished before the kill; give it more epochs:" >&2
  cat "$dir/first.log" >&2
  exit 1
fi
wait "$pid" 2>/dev/null || true

if ! "$train" --resume "$ckpt" >"$dir/resume.log" 2>&1; then
  echo "kill_resume: rdnet_train --resume $ckpt failed after a SIGKILL:" >&2
  cat "$dir/resume.log" >&2
  exit 1
fi
rows=$(($(wc -l <"$dir/run/metrics.csv") - 1))
if ! grep -q "resuming .* at epoch" "$dir/resume.log" || ! grep -q "^epoch $epochs/$epochs: " "$dir/resume.log" ||
   ! grep -q "done: best test accuracy" "$dir/resume.log" || [ "$rows" -ne "$epochs" ]; then
  echo "kill_resume: the resumed run did not finish all $epochs epochs ($rows rows in metrics.csv):" >&2
  cat "$dir/resume.log" >&2
  exit 1
fi
echo "kill_resume: killed $ms ms after the first checkpoint; $(grep -o 'resuming .* at epoch [0-9]*' "$dir/resume.log");" \
     "finished epoch $epochs/$epochs with $rows rows of metrics"
