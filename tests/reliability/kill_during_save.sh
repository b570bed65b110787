#!/bin/sh
# tests/reliability/kill_during_save.sh: SIGKILLs save_loop at random moments while it rewrites one
# multi-MB checkpoint (io::write_safetensors: temp file, fsync, rename) and checks after every kill
# that the file at the path is one complete version, never older than the last one seen.
# usage: kill_during_save.sh SAVE_LOOP WORK_DIR [KILLS=20] [MB=8]
# A killed writer may leave its temporary file (<path>.tmp.<pid>) behind; the path itself is never torn.
set -eu
loop=$1 dir=$2 kills=${3:-20} mb=${4:-8}
rm -rf "$dir"
mkdir -p "$dir"
path=$dir/checkpoint.safetensors

"$loop" write "$path" "$mb" 1 >/dev/null  # version 1 is complete before the first kill
first=1 last=1 mid_write=0 i=1
while [ "$i" -le "$kills" ]; do
  "$loop" write "$path" "$mb" 0 >"$dir/write.log" 2>&1 &
  pid=$!
  ms=$(($(od -An -N2 -tu2 /dev/urandom) % 400 + 1))  # 1..400 ms: a save takes tens of ms
  sleep "$(printf '%d.%03d' $((ms / 1000)) $((ms % 1000)))"
  if ! kill -KILL "$pid" 2>/dev/null; then
    echo "kill_during_save: save_loop exited by itself before kill $i:" >&2
    cat "$dir/write.log" >&2
    exit 1
  fi
  wait "$pid" 2>/dev/null || true  # 137: killed
  [ -e "$path.tmp.$pid" ] && mid_write=$((mid_write + 1))
  if ! out=$("$loop" check "$path" "$last" 2>&1); then
    echo "kill_during_save: after SIGKILL $i (at $ms ms), $path is not a complete version >= $last: $out" >&2
    exit 1
  fi
  last=${out#version }
  i=$((i + 1))
done
echo "kill_during_save: $kills SIGKILLs at random moments, $mid_write of them inside a write" \
     "(a temporary file left); after each, $path was one complete version ($first -> $last)"
