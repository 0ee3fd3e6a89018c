#!/usr/bin/env bash
# Thin wrapper: `pairstyle bench perf --vs-reference` does the work (runs this directory's
# bench_reference.py as a child with the same cases and threads, then prints both tables and the
# ratios ours/reference with the goals of issue 7). Kept so that older commands keep working.
#
#   tools/reference/compare.sh --model tests/fixtures/tiny-sd15 --latent 8 --rank 4 --reps 1
#   tools/reference/compare.sh --size sd15 --latent 32 --rank 64 --threads 2
#
# Every argument goes to `pairstyle bench perf`; --threads defaults to 2 here.
# Environment: PAIRSTYLE_BIN (default target/release/pairstyle), PYTHON (default
# tools/reference/.venv/bin/python if present, else python3).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
bin="${PAIRSTYLE_BIN:-$root/target/release/pairstyle}"
if [[ -n "${PYTHON:-}" ]]; then
    py="$PYTHON"
elif [[ -x "$here/.venv/bin/python" ]]; then
    py="$here/.venv/bin/python"
else
    py=python3
fi
case " $* " in
    *" -h "*|*" --help "*) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
esac
threads=()
case " $* " in
    *" --threads "*|*" --threads="*) ;;
    *) threads=(--threads 2) ;;
esac
if [[ ! -x "$bin" ]]; then
    echo "compare.sh: no pairstyle binary at $bin (cargo build --release, or set PAIRSTYLE_BIN)" >&2
    exit 2
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
# A config of our own so a user config cannot change the device or the precision.
printf '[runtime]\ndevice = "cpu"\ndtype = "f32"\n' > "$tmp/pairstyle.toml"

"$bin" --config "$tmp/pairstyle.toml" bench perf --vs-reference --python "$py" \
    --reference-script "$here/bench_reference.py" "${threads[@]}" "$@"
