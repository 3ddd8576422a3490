#!/usr/bin/env bash
# THE test command of memprof-limits (CI runs it through .ci/run):
#
#   bash scripts/test.sh [options] [pytest args...]
#
# For each CPython 3.11-3.13 that pyenv has (3.11 at least), in .venvs/<X.Y>:
#   install the project editable with [dev,kernel,repl,dask] (this compiles the cffi sampler; a
#   change under native/ forces a clean rebuild), then pytest, then CPython's own regression
#   tests with the engine started (scripts/cpython_regrtest.py). ruff and mypy run once, on
#   the first version. Debian packages the tests need are installed first when missing.
#
# Options (anything else, and everything after `--`, goes to pytest):
#   --quick          only the first version, no `slow`-marked tests, no CPython regression
#                    tests (for developers)
#   --skip-lint      no ruff/mypy                 --skip-regrtest   no CPython regression tests
#   --build-only     only install (apt + venvs); no lint, no tests
#   --lint-only      only install the first version, then ruff and mypy
#   --help           this text
# Environment:
#   PYVERSIONS="3.11 3.13"   restrict the versions (default: every 3.11-3.13 pyenv has)
#   REGRTEST_ARGS="..."      extra arguments for scripts/cpython_regrtest.py
#   TEST_SH_BUDGET=5100      seconds the whole script may take (CI kills at 5400): a pytest or
#                            regrtest run is stopped when it would overrun, later steps are
#                            skipped, and the summary is still printed
#
# The summary at the end gives each step's result and time per version, and closes with
# `N passed, N failed, N skipped`: pytest's counts summed over the versions, where every
# failed step that is not a pytest test (install, ruff, mypy, regrtest, no test collected)
# counts as one more failure. The exit status is non-zero if anything failed.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
ROOT=$PWD
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 PYTHONUNBUFFERED=1

# ---- Debian packages the tests need ---------------------------------------------------------
# EXTEND HERE: one Debian package per entry, with a comment saying which tests need it.
# Missing ones are installed (apt-get update once, then apt-get install, non-interactively).
APT_PACKAGES=(
    tmux  # tests/repl drive the REPL in a real terminal (send-keys / capture-pane)
    chromium  # tests/notebooks/test_browser.py: JupyterLab in headless Chromium via Playwright
)
# ---------------------------------------------------------------------------------------------

SUPPORTED_MINORS=(3.11 3.12 3.13)
QUICK=0 SKIP_LINT=0 SKIP_REGRTEST=0 BUILD_ONLY=0 LINT_ONLY=0
PYTEST_ARGS=()
while (($#)); do
    case $1 in
        --quick) QUICK=1 ;;
        --skip-lint) SKIP_LINT=1 ;;
        --skip-regrtest) SKIP_REGRTEST=1 ;;
        --build-only) BUILD_ONLY=1 ;;
        --lint-only) LINT_ONLY=1 ;;
        --help) sed -n '2,/^set -uo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        --) shift; PYTEST_ARGS+=("$@"); break ;;
        *) PYTEST_ARGS+=("$1") ;;
    esac
    shift
done
((QUICK || LINT_ONLY)) && SKIP_REGRTEST=1
# --quick leaves out the tests marked `slow` (pyproject.toml), unless a -m of yours selects.
if ((QUICK)) && [[ ! " ${PYTEST_ARGS[*]-} " =~ " -m " ]]; then
    PYTEST_ARGS=(-m "not slow" "${PYTEST_ARGS[@]}")
fi

LOGDIR=$ROOT/.venvs/logs
mkdir -p "$LOGDIR"
T_START=$SECONDS
BUDGET=${TEST_SH_BUDGET:-5100}
# Seconds left in the budget (at least 1).
remaining() {
    local left=$((BUDGET - (SECONDS - T_START)))
    ((left > 0)) || left=1
    echo "$left"
}
# budgeted CMD...: run CMD, killed (exit 124) if it would overrun the budget. --foreground keeps
# CMD in our process group, so that Ctrl+C reaches it.
budgeted() { timeout --foreground -k 30 "$(remaining)" "$@"; }

printf 'memprof-limits tests: %s, %s cores, commit %s, CI=%s\n' "$(date -u '+%F %T UTC')" \
    "$(nproc)" "$(git rev-parse --short HEAD 2>/dev/null || echo none)" "${CI:-}"

# ---- bookkeeping ----------------------------------------------------------------------------
STEPS=()                      # in order
declare -A STEP_RESULT=() STEP_TIME=() STEP_NOTE=()
FAILED_STEPS=0
PYTEST_RAN=()                                                      # versions pytest ran on
TOTAL_PASSED=0 TOTAL_FAILED=0 TOTAL_SKIPPED=0                      # pytest's closing lines
TOTAL_SUBPASSED=0 TOTAL_SUBFAILED=0 TOTAL_PYTEST_FAILED=0           # and their subtests
REGRTEST_RUN=0 REGRTEST_FAILURES=0 REGRTEST_SKIPPED=0               # CPython's "Total tests"

banner() { printf '\n\033[1m======== %s ========\033[0m\n' "$*"; }

# record NAME RC SECONDS [NOTE]
record() {
    STEPS+=("$1")
    STEP_TIME[$1]=$3
    STEP_NOTE[$1]=${4:-}
    if [[ $2 == 0 ]]; then STEP_RESULT[$1]=ok; else STEP_RESULT[$1]=FAILED; fi
}

# step NAME CMD...: run CMD (no stdin), record its result and time; returns CMD's status.
step() {
    local name=$1 t0=$SECONDS rc
    shift
    banner "$name"
    if ((SECONDS - T_START >= BUDGET)); then
        echo "!! over the time budget (${BUDGET}s): not run"
        record "$name" 1 0 "not run: over the time budget"
        FAILED_STEPS=$((FAILED_STEPS + 1))
        return 1
    fi
    "$@" </dev/null
    rc=$?
    record "$name" "$rc" $((SECONDS - t0))
    if ((rc != 0)); then
        FAILED_STEPS=$((FAILED_STEPS + 1))
        echo "!! $name failed (exit status $rc)"
    fi
    return "$rc"
}

# failure_digest: each failed pytest test of this run, with the end of its report (the
# assertion and what it printed), read from the junit files; kept short so it stays in the
# part of the output that CI keeps (the end).
failure_digest() {
    local xmls=() v
    for v in "${PYTEST_RAN[@]}"; do
        [[ -f $LOGDIR/pytest-$v.xml ]] && xmls+=("$LOGDIR/pytest-$v.xml")
    done
    ((${#xmls[@]})) || return 0
    python3 - "${xmls[@]}" <<'PY'
import sys
import xml.etree.ElementTree as ET

for path in sys.argv[1:]:
    version = path.rsplit("pytest-", 1)[1].removesuffix(".xml")
    for case in ET.parse(path).getroot().iter("testcase"):
        for bad in (*case.findall("failure"), *case.findall("error")):
            name = f"{case.get('classname', '')}::{case.get('name', '')}"
            print(f"-- {version} {name}: {bad.tag}")
            lines = (bad.text or bad.get("message") or "").rstrip().splitlines()
            for line in lines[-14:]:
                print(f"   {line[:300]}")
PY
}

fmt_time() { printf '%dm%02ds' $(($1 / 60)) $(($1 % 60)); }

summary() {
    local total=$((SECONDS - T_START)) name
    if ((${#PYTEST_RAN[@]})) && ((TOTAL_PYTEST_FAILED)); then
        banner "failures"
        failure_digest
    fi
    banner "summary"
    printf '%-24s %-7s %6s  %s\n' step result time notes
    for name in "${STEPS[@]}"; do
        printf '%-24s %-7s %6s  %s\n' "$name" "${STEP_RESULT[$name]}" \
            "$(fmt_time "${STEP_TIME[$name]}")" "${STEP_NOTE[$name]}"
    done
    echo "total time: $(fmt_time $total)"
    echo "logs: .venvs/logs/"
    if ((FAILED_STEPS)); then
        echo "RESULT: FAILED ($FAILED_STEPS failed steps, $TOTAL_FAILED failures in all)"
    else
        echo "RESULT: OK"
    fi
    ((BUILD_ONLY || LINT_ONLY)) && return
    # The sums of what the runners printed, and the failures of the other steps.
    echo "pytest: $TOTAL_PASSED passed, $TOTAL_PYTEST_FAILED failed, $TOTAL_SKIPPED skipped" \
        "(subtests: $TOTAL_SUBPASSED passed, $TOTAL_SUBFAILED failed)"
    ((REGRTEST_RUN)) && echo "CPython regrtest with the engine: run=$REGRTEST_RUN" \
        "failures=$REGRTEST_FAILURES skipped=$REGRTEST_SKIPPED"
    # Last, in the format CI reads: pytest's passed and skipped; failed = pytest's failures
    # plus one per other failed step (install, ruff, mypy, regrtest).
    echo "$TOTAL_PASSED passed, $TOTAL_FAILED failed, $TOTAL_SKIPPED skipped"
}

# ---- Debian packages ------------------------------------------------------------------------
install_apt_packages() {
    local missing=() pkg sudo=()
    for pkg in "${APT_PACKAGES[@]}"; do
        [[ $(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null) == installed ]] ||
            missing+=("$pkg")
    done
    if ((${#missing[@]} == 0)); then
        echo "all present: ${APT_PACKAGES[*]}"
        return 0
    fi
    if ((EUID != 0)); then
        if ! command -v sudo >/dev/null; then
            echo "not root and no sudo: cannot install ${missing[*]}"
            return 1
        fi
        sudo=(sudo -n)
    fi
    echo "installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    "${sudo[@]}" apt-get -q update &&
        "${sudo[@]}" apt-get -q -y -o DPkg::Lock::Timeout=300 install --no-install-recommends \
            "${missing[@]}"
}

# ---- interpreters ---------------------------------------------------------------------------
# Fills VERSIONS (X.Y, ascending) and INTERP[X.Y]=path of that CPython.
declare -A INTERP=()
VERSIONS=()
list_pyenv_versions() {
    if command -v pyenv >/dev/null; then
        pyenv versions --bare 2>/dev/null
    elif [[ -d $1/versions ]]; then  # pyenv not on PATH: its versions directory
        ls -1 "$1/versions"
    fi
}
find_interpreters() {
    local root="" minor best wanted=("${SUPPORTED_MINORS[@]}")
    if [[ -n ${PYVERSIONS:-} ]]; then
        read -r -a wanted <<<"$PYVERSIONS"
    fi
    if command -v pyenv >/dev/null; then
        root=$(pyenv root)
    fi
    root=${root:-${PYENV_ROOT:-$HOME/.pyenv}}
    for minor in "${wanted[@]}"; do
        if [[ ! " ${SUPPORTED_MINORS[*]} " == *" $minor "* ]]; then
            echo "!! PYVERSIONS: $minor is not a supported version (${SUPPORTED_MINORS[*]})"
            return 1
        fi
        best=$(list_pyenv_versions "$root" | grep -E "^${minor//./\\.}\.[0-9]+$" | sort -V |
            tail -n 1)
        if [[ -n $best && -x $root/versions/$best/bin/python ]]; then
            INTERP[$minor]=$root/versions/$best/bin/python
        elif [[ -n ${PYVERSIONS:-} ]] && command -v "python$minor" >/dev/null &&
            "python$minor" -c 1 2>/dev/null; then
            INTERP[$minor]=$(command -v "python$minor")
        elif [[ -n ${PYVERSIONS:-} ]]; then
            echo "!! PYVERSIONS asks for $minor, which pyenv does not have"
            return 1
        else
            continue
        fi
        VERSIONS+=("$minor")
        echo "$minor: ${INTERP[$minor]}"
    done
    if [[ ! " ${VERSIONS[*]} " == *" 3.11 "* && -z ${PYVERSIONS:-} ]]; then
        echo "!! no CPython 3.11 in 'pyenv versions': it is required"
        return 1
    fi
    ((${#VERSIONS[@]})) || { echo "!! no CPython to test"; return 1; }
}

# ---- editable install -----------------------------------------------------------------------
# What the compiled sampler depends on: a change here forces a clean rebuild.
native_stamp() {
    {
        find native -type f ! -name '*.pyc' ! -path '*/__pycache__/*' -print0 2>/dev/null |
            sort -z | xargs -0 -r sha256sum
        sha256sum setup.py pyproject.toml
    } | sha256sum | cut -d' ' -f1
}

install_version() {
    local v=$1 py=${INTERP[$1]} venv=.venvs/$1 tag want have stamp
    tag=${v/./}
    want=$("$py" -c 'import sys; print(sys.version.split()[0])') || return 1
    have=$("$venv/bin/python" -c 'import sys; print(sys.version.split()[0])' 2>/dev/null)
    if [[ $have != "$want" ]]; then
        echo "creating $venv with $py ($want)"
        rm -rf "$venv"
        "$py" -m venv "$venv" || return 1
        "$venv/bin/python" -m pip install -q --upgrade pip || return 1
        rm -f "$venv/.native-stamp"
    fi
    stamp=$(native_stamp)
    if [[ $(cat "$venv/.native-stamp" 2>/dev/null) != "$stamp" ]]; then
        echo "native sources changed since the last build for $v: clean rebuild"
        rm -f src/memprof_limits/*.cpython-"$tag"-*.so
        find build -maxdepth 1 -name "*cpython-$tag*" -exec rm -rf {} + 2>/dev/null
    fi
    # Build requirements from pyproject.toml, then the project without build isolation (faster
    # than a fresh isolated build environment each time, and the same requirements).
    "$venv/bin/python" - >"$venv/.build-requires" <<'EOF' || return 1
import tomllib
with open("pyproject.toml", "rb") as f:
    print("\n".join(tomllib.load(f)["build-system"]["requires"]))
EOF
    "$venv/bin/python" -m pip install -q -r "$venv/.build-requires" || return 1
    "$venv/bin/python" -m pip install -q --no-build-isolation -e ".[dev,kernel,repl,dask]" || return 1
    echo "$stamp" >"$venv/.native-stamp"
    "$venv/bin/python" -c 'import memprof_limits; print("import memprof_limits: ok,", memprof_limits.__file__)'
}

# ---- pytest ---------------------------------------------------------------------------------
# run_pytest X.Y: pytest with the extra args; adds its counts to the totals.
run_pytest() {
    local v=$1 xml=$LOGDIR/pytest-$1.xml log=$LOGDIR/pytest-$1.log t0=$SECONDS rc counts
    local passed failed skipped ran subpassed subfailed note
    banner "$v pytest"
    rm -f "$xml"
    PYTEST_RAN+=("$v")
    if ((SECONDS - T_START >= BUDGET)); then
        echo "!! over the time budget (${BUDGET}s): not run"
        record "$v pytest" 1 0 "not run: over the time budget"
        FAILED_STEPS=$((FAILED_STEPS + 1)) TOTAL_FAILED=$((TOTAL_FAILED + 1))
        return
    fi
    budgeted .venvs/"$v"/bin/python -m pytest --junitxml="$xml" "${PYTEST_ARGS[@]}" </dev/null |
        tee "$log"
    rc=${PIPESTATUS[0]}
    ((rc == 124)) && echo "!! pytest stopped: the script's time budget (${BUDGET}s) ran out"
    # The counts of pytest's own closing line ("== 2 failed, 867 passed, 1 skipped, 14
    # subtests passed in 300.47s =="), not the JUnit file's (which counts subtests as tests).
    counts=$(.venvs/"$v"/bin/python - "$log" <<'EOF'
import re
import sys
text = open(sys.argv[1], encoding="utf-8", errors="replace").read()
text = re.sub(r"\x1b\[[0-9;]*m", "", text)
lines = re.findall(r"^=+ (.*?) in [0-9.]+s(?: \([0-9:]+\))? =+$", text, re.M)
found = {}
for n, what in re.findall(
    r"(\d+) (subtests passed|subtests failed|passed|failed|errors?|skipped|xfailed|xpassed)",
    lines[-1] if lines else "",
):
    found["error" if what.startswith("error") else what] = int(n)
passed = found.get("passed", 0) + found.get("xpassed", 0)
failed = found.get("failed", 0) + found.get("error", 0)
skipped = found.get("skipped", 0) + found.get("xfailed", 0)
sub_passed, sub_failed = found.get("subtests passed", 0), found.get("subtests failed", 0)
print(passed, failed, skipped, passed + failed + skipped, sub_passed, sub_failed)
EOF
    )
    read -r passed failed skipped ran subpassed subfailed <<<"$counts"
    note="$passed passed, $failed failed, $skipped skipped"
    ((subpassed + subfailed)) && note="$note (subtests: $subpassed passed, $subfailed failed)"
    if ((rc == 5)) || ((ran == 0 && rc == 0)); then
        note="no tests ran (pytest exit status $rc)"
        ((failed == 0)) && failed=1
        rc=5
    elif ((rc == 124)); then
        note="stopped: over the time budget; $note"
        ((failed == 0)) && failed=1
    elif ((rc != 0 && failed == 0)); then
        note="$note; pytest exit status $rc"
        failed=1
    fi
    TOTAL_PASSED=$((TOTAL_PASSED + passed))
    TOTAL_PYTEST_FAILED=$((TOTAL_PYTEST_FAILED + failed))
    TOTAL_SUBPASSED=$((TOTAL_SUBPASSED + subpassed)) TOTAL_SUBFAILED=$((TOTAL_SUBFAILED + subfailed))
    TOTAL_FAILED=$((TOTAL_FAILED + failed))
    TOTAL_SKIPPED=$((TOTAL_SKIPPED + skipped))
    record "$v pytest" "$rc" $((SECONDS - t0)) "$note"
    if ((rc != 0)); then
        FAILED_STEPS=$((FAILED_STEPS + 1))
        echo "!! $v pytest failed: $note"
    fi
}

# ---- CPython's regression tests with the engine (log kept for the summary's note) -----------
run_regrtest() {
    local v=$1 log=$LOGDIR/regrtest-$1.log
    rm -f "$log"
    # shellcheck disable=SC2086  # REGRTEST_ARGS is a list of words
    budgeted .venvs/"$v"/bin/python scripts/cpython_regrtest.py ${REGRTEST_ARGS:-} 2>&1 |
        tee "$log"
    return "${PIPESTATUS[0]}"
}

# count_regrtest X.Y: adds CPython's own "Total tests: run=N failures=F skipped=S" line of the
# run with the engine (the first such line: a diagnosis re-run without it may follow).
count_regrtest() {
    local line run failures skipped
    line=$(grep -m1 '^Total tests: run=' "$LOGDIR/regrtest-$1.log" 2>/dev/null)
    run=$(sed -n 's/.*run=\([0-9]*\).*/\1/p' <<<"$line")
    failures=$(sed -n 's/.*failures=\([0-9]*\).*/\1/p' <<<"$line")
    skipped=$(sed -n 's/.*skipped=\([0-9]*\).*/\1/p' <<<"$line")
    REGRTEST_RUN=$((REGRTEST_RUN + ${run:-0}))
    REGRTEST_FAILURES=$((REGRTEST_FAILURES + ${failures:-0}))
    REGRTEST_SKIPPED=$((REGRTEST_SKIPPED + ${skipped:-0}))
}

# counted_step NAME CMD...: a step whose failure counts as one failure in the closing line.
counted_step() {
    step "$@" || { TOTAL_FAILED=$((TOTAL_FAILED + 1)); return 1; }
}

# ---- main -----------------------------------------------------------------------------------
trap 'echo; echo "interrupted"; summary; exit 130' INT TERM

counted_step "apt packages" install_apt_packages
counted_step "find interpreters" find_interpreters || { summary; exit 1; }
((QUICK || LINT_ONLY)) && VERSIONS=("${VERSIONS[0]}")

first=1
for v in "${VERSIONS[@]}"; do
    if ! counted_step "$v install" install_version "$v"; then
        echo "!! skipping the tests of $v: its install failed"
        first=0
        continue
    fi
    if ((first && !SKIP_LINT && !BUILD_ONLY)); then
        counted_step "ruff ($v)" .venvs/"$v"/bin/python -m ruff check .
        counted_step "mypy ($v)" .venvs/"$v"/bin/python -m mypy
    fi
    first=0
    ((BUILD_ONLY || LINT_ONLY)) && continue
    run_pytest "$v"
    if ((!SKIP_REGRTEST)); then
        counted_step "$v regrtest (engine)" run_regrtest "$v"
        STEP_NOTE["$v regrtest (engine)"]=$(sed -n 's/^== regrtest [0-9.]* engine: //p' \
            "$LOGDIR/regrtest-$v.log" 2>/dev/null | tail -n 1)
        count_regrtest "$v"
    fi
done

summary
((FAILED_STEPS == 0))
