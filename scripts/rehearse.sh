#!/usr/bin/env bash
# Rehearse configs/paper.yaml end to end before renting GPUs: a temporary clone of this repository,
# switched to configs/rehearsal.yaml (the paper config with tiny local stand-ins), `dvc repro` to the
# last stage. Prints the clone's path last; its results/predictions/finedefics/<name>.json are FOCI
# results files (`finedefics score` reads them).
#
#   scripts/rehearse.sh                         # the six fixture trees (published layouts, FOCI test keys)
#   scripts/rehearse.sh --data DIR [--per-class N]   # DIR/<name>/ in the published layouts, N images per class (1)
set -euo pipefail

usage() { sed -n 2,8p "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
data="" per_class=1
while [ $# -gt 0 ]; do
  case "$1" in
    --data) [ -d "${2:?--data needs a folder}" ] || { echo "error: --data $2: no such folder" >&2; exit 2; }
            data=$(cd "$2" && pwd); shift 2 ;;
    --per-class) per_class=${2:?--per-class needs a number}; shift 2 ;;
    -h|--help) usage ;;
    *) echo "error: unknown argument $1" >&2; usage 2 >&2 ;;
  esac
done
case "$per_class" in ''|*[!0-9]*|0) echo "error: --per-class must be a positive integer" >&2; exit 2 ;; esac
for name in dog-120 bird-200 aircraft-102 flower-102 pet-37 car-196; do
  [ -z "$data" ] || [ -d "$data/$name" ] || { echo "error: --data $data: no folder $name/ (the six datasets, docs/paper-scale.md)" >&2; exit 2; }
done

repo=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
clone=$(mktemp -d "${TMPDIR:-/tmp}/finedefics-rehearsal.XXXXXX")/repo
git clone -q "$repo" "$clone"
echo "== rehearsing in $clone (the committed code of $repo)"
cd "$clone"
export PYTHONPATH="$clone/src${PYTHONPATH:+:$PYTHONPATH}"  # this clone's code, whatever is installed
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
unset MLFLOW_TRACKING_URI                                  # the clone's own store, mlflow.db
start=$(date +%s)

echo "== stand-ins and data"
python scripts/rehearsal.py build ${data:+--data "$data"}
python scripts/rehearsal.py serve --url-file rehearsal/server.url > rehearsal/server.log 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 600); do [ -s rehearsal/server.url ] && break; kill -0 $server 2>/dev/null || break; sleep 0.1; done
[ -s rehearsal/server.url ] || { echo "error: the LLM server did not start:" >&2; cat rehearsal/server.log >&2; exit 1; }
url=$(cat rehearsal/server.url)

echo "== configs/rehearsal.yaml, LLM server at $url"
python -m finedefics.cli use-config configs/rehearsal.yaml \
  --set "attributes.discover.base_url=$url" --set "attributes.summarize.base_url=$url" \
  --set "real.per_class=$per_class"
dvc repro
echo "== rehearsal done in $(( $(date +%s) - start )) s"
echo "$clone"
