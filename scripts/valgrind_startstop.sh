#!/usr/bin/env bash
# Start/stop leak check of the engine (issue 2): "Start/stop 1000 times in a loop with threads
# allocating: no crash, no leak (valgrind)".  Driver: tests/native/startstop_leak.py.
#
#   bash scripts/valgrind_startstop.sh            # every .venvs/3.X that exists
#   PYTHONS="/tmp/b-311/bin/python /tmp/b-313/bin/python" bash scripts/valgrind_startstop.sh
#
# Per interpreter:
#   1. natively: $CYCLES_NATIVE (1000) start/stop cycles while 2 threads allocate -> exit 0;
#   2. under valgrind memcheck (PYTHONMALLOC=malloc, --leak-check=full
#      --show-leak-kinds=definite), three runs: 0 cycles (baseline: same threads and imports,
#      the engine never started), $CYCLES_SHORT (100) and $CYCLES_VALGRIND (1000) cycles.
#      Valgrind serialises the threads, so the driver's cycles stay cheap: 1000 cycles take
#      about 40 s per interpreter on the reference VM (set CYCLES_VALGRIND=100 if slower).
# Then a table per run: "definitely lost" in all, the part whose stack mentions our module
# (the naive `_native` filter), and how that part splits: blocks allocated by our own C code
# (sampler.c, memprof.c: should be 0), blocks CPython or cffi allocated *through* our
# pass-through hooks (their allocations, not ours), and one-time import/cffi-cache blocks.
# A leak per cycle shows as "definitely lost" growing with the number of cycles.
# Memcheck errors (invalid reads/writes...) with a frame in our code are listed too.
# Logs: $OUT (default .venvs/logs/valgrind).  Exit status non-zero if a native run failed, a
# run crashed, or our own code leaked or had memcheck errors.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2

CYCLES_NATIVE=${CYCLES_NATIVE:-1000}
CYCLES_SHORT=${CYCLES_SHORT:-100}
CYCLES_VALGRIND=${CYCLES_VALGRIND:-1000}
OUT=${OUT:-.venvs/logs/valgrind}
mkdir -p "$OUT"
command -v valgrind >/dev/null || { echo "valgrind is not installed"; exit 2; }

if [[ -z ${PYTHONS:-} ]]; then
    PYTHONS=""
    for v in 3.11 3.12 3.13; do
        [[ -x .venvs/$v/bin/python ]] && PYTHONS+=" .venvs/$v/bin/python"
    done
fi
[[ -n ${PYTHONS// /} ]] || { echo "no interpreter: set PYTHONS or run scripts/test.sh --build-only"; exit 2; }

status=0
for py in $PYTHONS; do
    ver=$("$py" -c 'import platform; print(platform.python_version())') || { status=1; continue; }
    echo "==== CPython $ver ($py)"
    t0=$SECONDS
    if "$py" tests/native/startstop_leak.py --cycles "$CYCLES_NATIVE"; then
        echo "native: $CYCLES_NATIVE cycles ok ($((SECONDS - t0)) s)"
    else
        echo "!! native run failed"
        status=1
    fi
    logs=()
    for cycles in 0 "$CYCLES_SHORT" "$CYCLES_VALGRIND"; do
        log=$OUT/valgrind-$ver-$cycles.log
        t0=$SECONDS
        PYTHONMALLOC=malloc valgrind --tool=memcheck --leak-check=full \
            --show-leak-kinds=definite --errors-for-leak-kinds=definite --num-callers=40 \
            --log-file="$log" "$py" tests/native/startstop_leak.py --cycles "$cycles"
        rc=$?
        echo "valgrind, $cycles cycles: exit status $rc ($((SECONDS - t0)) s) -> $log"
        ((rc == 0)) || status=1
        logs+=("$cycles=$log")
    done
    "$py" - "${logs[@]}" <<'EOF' || status=1
import re
import sys

OURS = re.compile(r"\((?:sampler|memprof|testing)\.c:\d+\)")
NATIVE = re.compile(r"_native")
PASS_THROUGH = re.compile(r": (?:h_(?:raw|mem|obj)_(?:malloc|calloc|realloc)|np_(?:malloc|calloc|realloc)) ")
ONE_TIME = re.compile(r"PyInit__native|_cffi_init|lib_build_and_cache_attr")
ALLOC = re.compile(r": (?:malloc|calloc|realloc|_PyMem_Raw\w+|PyMem_\w+|PyObject_(?:Malloc|Calloc|Realloc)) ")


def parse(path):
    text = open(path).read()
    lines = [re.sub(r"^==\d+== ?", "", ln) for ln in text.splitlines()]
    records, errors, cur = [], [], None
    for ln in lines:
        m = re.match(r"([\d,]+)(?: \(([\d,]+) direct, ([\d,]+) indirect\))? bytes in [\d,]+ blocks are definitely lost", ln)
        if m:
            direct = m.group(2) or m.group(1)
            cur = {"bytes": int(direct.replace(",", "")), "frames": [], "kind": "leak"}
            records.append(cur)
            continue
        if re.match(r"(Invalid|Conditional jump|Use of uninitialised|Syscall param|Mismatched free)", ln):
            cur = {"frames": [], "kind": "error", "what": ln}
            errors.append(cur)
            continue
        if cur is not None and re.match(r"\s*(at|by) 0x", ln):
            cur["frames"].append(ln.strip())
        elif cur is not None and not ln.strip():
            cur = None
    m = re.search(r"definitely lost: ([\d,]+) bytes in ([\d,]+) blocks", text)
    total = int(m.group(1).replace(",", "")) if m else 0
    return total, records, errors, "ERROR SUMMARY" in text


def classify(frames):
    # First frame that is neither the libc allocator nor CPython's allocator API.
    i = 0
    while i < len(frames) and ALLOC.search(frames[i]):
        i += 1
    site = frames[i] if i < len(frames) else ""
    if OURS.search(site) and not PASS_THROUGH.search(site):
        return "own"          # our C code called an allocator itself
    if any(ONE_TIME.search(f) for f in frames):
        return "one_time"     # module init / cffi's cache of built functions
    if PASS_THROUGH.search(site):
        return "through_hook"
    return "mentions"


rows, bad = [], False
for arg in sys.argv[1:]:
    cycles, path = arg.split("=", 1)
    total, records, errors, complete = parse(path)
    native = [r for r in records if any(NATIVE.search(f) or OURS.search(f) for f in r["frames"])]
    split = {"own": 0, "one_time": 0, "through_hook": 0, "mentions": 0}
    for r in native:
        split[classify(r["frames"])] += r["bytes"]
    our_errors = [e for e in errors if any(OURS.search(f) for f in e["frames"])]
    if split["own"] or our_errors or not complete:
        bad = True
    rows.append((cycles, total, sum(r["bytes"] for r in native), split, len(errors), our_errors, complete))

print()
print("| cycles | definitely lost (all) | stacks mentioning _native | allocated by our C code "
      "| CPython/cffi blocks allocated through our hooks | one-time (import, cffi cache) "
      "| other | memcheck errors (in our code) |")
print("|---|---|---|---|---|---|---|---|")
for cycles, total, nat, split, nerr, ours, complete in rows:
    flag = "" if complete else " (log incomplete: crash?)"
    print(f"| {cycles}{flag} | {total:,} | {nat:,} | {split['own']:,} | {split['through_hook']:,} "
          f"| {split['one_time']:,} | {split['mentions']:,} | {nerr} ({len(ours)}) |")
for cycles, *_rest, ours, _c in rows:
    for e in ours[:5]:
        print(f"\nmemcheck error in our code ({cycles} cycles): {e['what']}")
        print("\n".join("    " + f for f in e["frames"][:12]))
sys.exit(1 if bad else 0)
EOF
done
exit $status
