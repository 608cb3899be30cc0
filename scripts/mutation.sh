#!/usr/bin/env bash
# Mutation testing of the engine's core (sampler, scheduler, sequence, paging, model_inputs, weight_loader) and the
# parity harness's verdicts (metrics, checks, report) with mutmut; too slow for every CI run. Its summary lives in
# notes/mutation.md (see scripts/mutation.py).
#
#     bash scripts/mutation.sh                     # every module, one mutant at a time (hours on two shared cores)
#     bash scripts/mutation.sh sampler paging      # some modules
#     bash scripts/mutation.sh --update-notes      # ... and write the table into notes/mutation.md
#     bash scripts/mutation.sh --stored --update-notes   # the table from the results kept in the work folder
#
# MUTATION_WORK (default /tmp/lmdp-mutation) holds a copy of the repository per module, mutmut's state and logs,
# table.md and survivors.md (each surviving mutant's diff). MUTATION_JOBS runs that many mutants at once.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -c 'import mutmut, hypothesis' 2>/dev/null || { echo "scripts/mutation.sh: needs mutmut>=3.8 and hypothesis (pip install 'mutmut>=3.8' hypothesis)" >&2; exit 1; }
exec python3 scripts/mutation.py "$@"
