#!/usr/bin/env bash
# Run `pairstyle bench cost` and the PyTorch reference with the same arguments, print both
# tables and the ratios ours/reference per case.
#
#   tools/reference/compare.sh --model tests/fixtures/tiny-sd15 --latent 8 --rank 4 --reps 1
#   tools/reference/compare.sh --size sd15 --latent 32 --rank 64 --threads 2
#
# Arguments: --model DIR | --size sd15|sdxl, --latent N, --rank R, --reps N, --styles LIST go to
# both programs; --threads N (default 2) becomes RAYON_NUM_THREADS and [runtime] threads for ours
# and --threads for the reference; --as-published and --mixed-batch go to the reference only.
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

threads=2
ours_args=()
ref_args=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --threads) threads="${2:?--threads needs a value}"; shift 2 ;;
        --threads=*) threads="${1#*=}"; shift ;;
        --as-published|--mixed-batch) ref_args+=("$1"); shift ;;
        --model|--size|--latent|--rank|--reps|--styles)
            ours_args+=("$1" "${2:?$1 needs a value}"); ref_args+=("$1" "$2"); shift 2 ;;
        --model=*|--size=*|--latent=*|--rank=*|--reps=*|--styles=*)
            ours_args+=("$1"); ref_args+=("$1"); shift ;;
        -h|--help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "compare.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
if ! [[ "$threads" =~ ^[1-9][0-9]*$ ]]; then
    echo "compare.sh: --threads must be a positive integer, got '$threads'" >&2; exit 2
fi
if [[ ! -x "$bin" ]]; then
    echo "compare.sh: no pairstyle binary at $bin (cargo build --release, or set PAIRSTYLE_BIN)" >&2
    exit 2
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
# A config of our own so a user config cannot change the thread count or the device.
printf '[runtime]\ndevice = "cpu"\ndtype = "f32"\nthreads = %s\n' "$threads" > "$tmp/pairstyle.toml"

echo "## ours: $bin bench cost ${ours_args[*]} (RAYON_NUM_THREADS=$threads)"
RAYON_NUM_THREADS="$threads" "$bin" --config "$tmp/pairstyle.toml" bench cost "${ours_args[@]}" \
    | tee "$tmp/ours.md"
echo
echo "## reference: $py $here/bench_reference.py ${ref_args[*]} --threads $threads"
"$py" "$here/bench_reference.py" "${ref_args[@]}" --threads "$threads" | tee "$tmp/ref.md"
echo

"$py" - "$tmp/ours.md" "$tmp/ref.md" <<'EOF'
import math
import re
import sys


def table(path):
    """Rows of the first markdown table whose header starts `| case | s |`."""
    rows, inside = [], False
    for line in open(path, encoding="utf-8"):
        line = line.strip()
        if line.startswith("| case | s |"):
            inside = True
            continue
        if inside:
            if not line.startswith("|"):
                break
            cells = [c.strip() for c in line.strip("|").split("|")]
            if set(cells[0]) <= set("-"):
                continue
            rows.append({"case": cells[0], "s": float(cells[1]),
                         "mib": float(cells[3]) if cells[3] else math.nan})
    return rows


def key(case):
    if case.startswith("training"):
        return "train"
    if "plain CFG" in case:
        return "plain"
    m = re.search(r"(\d+) style", case)
    if m:
        return f"styles{m.group(1)}" + ("-mixed" if "mixed-adapter" in case else "")
    return case


ours = {key(r["case"]): r for r in table(sys.argv[1])}
ref = table(sys.argv[2])
if not ours or not ref:
    sys.exit("compare.sh: could not find a `| case | s |` table in one of the outputs")
plain = ours.get("plain", {}).get("s")


def fmt(x, spec=".2f"):
    return "" if x is None or math.isnan(x) else format(x, spec)


print("## ours / reference")
print("| case | ours s | reference s | time ours/ref | ours peak MiB | reference peak MiB "
      "| memory ours/ref | goal (issue 7) |")
print("|---|---|---|---|---|---|---|---|")
for r in ref:
    k = key(r["case"])
    o = ours.get(k.removesuffix("-mixed"))
    if o is None:
        print(f"| {r['case']} | — | {r['s']:.3f} | — | — | {fmt(r['mib'], '.0f')} | — | |")
        continue
    t = o["s"] / r["s"] if r["s"] > 0 else math.nan
    mem = o["mib"] / r["mib"] if r["mib"] > 0 else math.nan
    goal = ""
    if k == "train":
        ok = t <= 1.0 and mem <= 1.0
        goal = f"time ≤ 1.0× and memory ≤ 1.0×: {'met' if ok else 'missed'}"
    elif k == "plain":
        goal = f"time ≤ 1.0×: {'met' if t <= 1.0 else 'missed'}"
    elif k.startswith("styles") and not k.endswith("-mixed") and plain:
        n = int(k[len("styles"):])
        own, bound = o["s"] / plain, (2 + n) / 2
        goal = (f"ours {own:.2f}× our plain CFG step ≤ {bound:.1f}×: "
                f"{'met' if own <= bound else 'missed'}")
    label = r["case"] if not k.endswith("-mixed") else r["case"] + " [vs our batched step]"
    print(f"| {label} | {o['s']:.3f} | {r['s']:.3f} | {fmt(t)} | {fmt(o['mib'], '.0f')} "
          f"| {fmt(r['mib'], '.0f')} | {fmt(mem)} | {goal} |")
EOF
