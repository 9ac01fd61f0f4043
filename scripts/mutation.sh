#!/usr/bin/env bash
# Mutation testing (docs/testing.md): mutmut breaks the modules that carry the promises one small
# change at a time and runs the tests that cover each change; a mutant no test notices "survives".
#
# Runs in a scratch copy of the tree (mutmut writes a mutants/ folder and must import the mutated
# code, not this checkout), within a time budget, and prints the score and every surviving mutant
# with its diff. Not part of `make test` or CI's default run: it takes tens of minutes.
#
#   MUTATE    modules to mutate (default: [tool.mutmut] only_mutate in pyproject.toml)
#   TESTS     tests to run against them (default: [tool.mutmut] pytest_add_cli_args_test_selection)
#   BUDGET_S  wall-clock budget in seconds (default 3600); at the budget mutmut stops and the
#             mutants it tried are reported, the rest are "not checked"
#   JOBS      mutants run at once (default: the CPU count)
#   OUT       folder for the results (default: ./mutation-out); results.txt is what docs/testing.md quotes
#
# Example, the bounded run recorded in docs/testing.md:
#   MUTATE="agent/protocol.py agent/journal.py" \
#   TESTS="tests/agent/test_protocol.py tests/agent/test_journal.py tests/agent/test_journal_durability.py" \
#   BUDGET_S=1500 JOBS=2 make mutation
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PY:-$ROOT/.venv/bin/python}
BUDGET_S=${BUDGET_S:-3600}
JOBS=${JOBS:-$(nproc)}
OUT=${OUT:-$ROOT/mutation-out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
MUTMUT=$(dirname "$PY")/mutmut
if [ ! -x "$MUTMUT" ]; then
  echo "mutmut not found next to $PY: install the mutation extra (pip install -e '.[mutation]')" >&2
  exit 2
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/coilsight-mutation.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
# The tree as git sees it (tracked and untracked-but-not-ignored files): no venv, no old mutants/.
git ls-files -z --cached --others --exclude-standard | xargs -0 -I{} cp --parents -- {} "$WORK" 2>/dev/null || true
cd "$WORK"

if [ -n "${MUTATE:-}" ] || [ -n "${TESTS:-}" ]; then
  "$PY" - "${MUTATE:-}" "${TESTS:-}" <<'EOF'
import json, re, sys
from pathlib import Path
mutate, tests = sys.argv[1].split(), sys.argv[2].split()
p = Path("pyproject.toml")
s = p.read_text()
if mutate:
    s = re.sub(r"(?ms)^only_mutate = \[.*?\]\n", f"only_mutate = {json.dumps(mutate)}\n", s)
if tests:
    s = re.sub(r"(?ms)^pytest_add_cli_args_test_selection = \[.*?\]\n",
               f"pytest_add_cli_args_test_selection = {json.dumps(tests)}\n", s)
p.write_text(s)
EOF
fi
"$PY" -c 'import tomllib; c = tomllib.load(open("pyproject.toml", "rb"))["tool"]["mutmut"]
print("mutated:", " ".join(c["only_mutate"])); print("tests:", " ".join(c["pytest_add_cli_args_test_selection"]))' \
  | tee "$OUT/config.txt"

# PYTHONPATH would put an unmutated tree first on the path: mutmut sets up its own.
unset PYTHONPATH
start=$(date +%s)
set +e
# SIGINT at the budget: mutmut stops its workers and keeps the verdicts it has.
timeout --signal=INT --kill-after=120 "$BUDGET_S" "$MUTMUT" run --max-children "$JOBS" >"$OUT/run.log" 2>&1
rc=$?
set -e
elapsed=$(( $(date +%s) - start ))
"$MUTMUT" export-cicd-stats >/dev/null 2>&1 || true
"$MUTMUT" results --all true >"$OUT/all.txt" 2>/dev/null || true
{
  echo "mutation run: $(date -u +%Y-%m-%dT%H:%MZ), ${elapsed}s of a ${BUDGET_S}s budget, mutmut exit $rc"
  cat "$OUT/config.txt"
  "$PY" - "$OUT/all.txt" <<'EOF'
import collections, sys
rows = [l.strip().rsplit(": ", 1) for l in open(sys.argv[1]) if ": " in l]
by_module = collections.defaultdict(collections.Counter)
for name, status in rows:
    by_module[".".join(name.split(".")[:2])][status] += 1
print(f"{'module':24} {'mutants':>7} {'killed':>6} {'survived':>8} {'no tests':>8} {'timeout':>7} {'not run':>7} {'score':>6}")
for mod, c in sorted(by_module.items()):
    tried = c["killed"] + c["survived"] + c["timeout"] + c["no tests"]
    score = 100.0 * (c["killed"] + c["timeout"]) / tried if tried else 0.0
    print(f"{mod:24} {sum(c.values()):7} {c['killed']:6} {c['survived']:8} {c['no tests']:8} {c['timeout']:7} "
          f"{c['not checked']:7} {score:5.1f}%")
EOF
  echo
  echo "surviving mutants:"
} >"$OUT/results.txt"
# The diff of each surviving mutant, read from mutants/ (one `mutmut show` per mutant took seconds each).
"$PY" - "$OUT/all.txt" >>"$OUT/results.txt" <<'EOF'
import difflib, re, sys
from pathlib import Path
rows = [l.strip().rsplit(": ", 1) for l in open(sys.argv[1]) if ": " in l]
cache = {}
def functions(module):
    if module not in cache:
        d, cur, indent = {}, None, 0
        for line in (Path("mutants") / (module.replace(".", "/") + ".py")).read_text().splitlines():
            m = re.match(r"^(\s*)def (\w+)\(", line)
            if m:
                cur, indent = m.group(2), len(m.group(1))
                d[cur] = [line]
            elif cur is not None:
                if line.strip() and len(line) - len(line.lstrip()) <= indent and not line.lstrip().startswith((")", "]", "}")):
                    cur = None
                else:
                    d[cur].append(line)
        cache[module] = d
    return cache[module]
for name, status in rows:
    if status not in ("survived", "no tests"):
        continue
    module, fn = ".".join(name.split(".")[:2]), name.split(".", 2)[2]
    f = functions(module)
    orig, mutant = f.get(fn.rsplit("__mutmut_", 1)[0] + "__mutmut_orig"), f.get(fn)
    print(f"# {name} ({status})")
    if orig and mutant:
        print("\n".join(l for l in difflib.unified_diff(orig[1:], mutant[1:], lineterm="", n=0)
                        if not l.startswith(("---", "+++", "@@"))))
EOF
cp mutants/mutmut-cicd-stats.json "$OUT/" 2>/dev/null || true
cat "$OUT/results.txt"
