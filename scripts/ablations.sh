#!/usr/bin/env bash
# Queue the paper's ablations (Tables 3a-c, 5, 6a-e) and Table 4's LLaVA-1.5 and Qwen2.5-VL as DVC experiments on the committed params,
# run them one after another, collect them into the experiment ledger (reports/ledger/), then write reports/results.md:
#   scripts/ablations.sh                       # queue, run, report (one training seed per row)
#   scripts/ablations.sh --seeds 3             # train.seed 0, 1, 2 for every row (experiments named <row>-s<seed>)
#   scripts/ablations.sh --only 'default|t3b|t6a|t6b' --seeds 3   # the rows whose names match (grep -E)
#   scripts/ablations.sh --queue ...           # only queue them
#   scripts/ablations.sh --run                 # run what is queued (e.g. after an interruption), then report
#   scripts/ablations.sh --jobs 1              # one experiment at a time with every core (default: 2; --regimes: 1)
#   scripts/ablations.sh --regimes --seeds 3   # the pre-registered regime study instead (finedefics/reporting/regimes.yaml):
#                                              # every candidate's default and Tables 3b/6a/6b rows -> reports/regimes.md
#   scripts/ablations.sh --regimes --unseen K --seeds 3   # then the unseen-categories table under candidate K
# Each experiment changes the params named on its line and nothing else; stages whose inputs did
# not change come back from DVC's run cache. `dvc exp show` lists them, MLflow holds their runs
# (the repository's mlflow.db, also for the queue's temporary workspaces).
set -euo pipefail
cd "$(dirname "$0")/.."

# Experiments side by side, each with an equal share of the cores' torch threads: on 2 cores two
# one-thread experiments finish more per hour than one two-thread one (docs/ablations.md). LoRA
# training writes the same weights at any thread count; full fine-tuning does not, so the regime
# study (whose first candidate trains every weight) runs one at a time with every core.
JOBS=2
seeds=1 only=. mode=all regimes=0 unseen=() jobs=
while (( $# )); do
  case $1 in
    --seeds) seeds=$2; shift 2 ;;
    --only) only=$2; shift 2 ;;
    --queue) mode=queue; shift ;;
    --run) mode=run; shift ;;
    --regimes) regimes=1; shift ;;
    --unseen) unseen=(--unseen "$2"); shift 2 ;;
    --jobs) jobs=$2; shift 2 ;;
    *) echo "usage: $0 [--seeds N] [--only REGEX] [--jobs N] [--regimes [--unseen K]] [--queue | --run]" >&2; exit 2 ;;
  esac
done
[[ -n $jobs ]] || { (( regimes )) && jobs=1 || jobs=$JOBS; }
if (( regimes )) && [[ $only != . ]]; then echo "--only applies to the paper's queue, not to --regimes" >&2; exit 2; fi
if (( ! regimes && ${#unseen[@]} )); then echo "--unseen needs --regimes" >&2; exit 2; fi
[[ $seeds =~ ^[1-9][0-9]*$ ]] || { echo "--seeds takes a positive integer, not '$seeds'" >&2; exit 2; }
[[ $jobs =~ ^[1-9][0-9]*$ ]] || { echo "--jobs takes a positive integer, not '$jobs'" >&2; exit 2; }

queue_all() {
  q() {
    grep -qE "$only" <<<"$1" || return 0
    for (( s = 0; s < seeds; s++ )); do dvc exp run --queue --name "$1-s$s" "${@:2}" -S "train.seed=$s"; done
  }

  q default                                                          # Tables 2 and 8, every "ours" row
  q t3a-finetune   -S align.paradigm=stage2-only -S instructions.stage2=open
  q t3b-obj-cat    -S align.objective=obj-cat                        # also Tables 6c/6d "None"
  q t3c-one-stage  -S align.paradigm=one-stage
  q t5-no-color    -S 'attributes.types=[shape,texture,size]'
  q t5-no-shape    -S 'attributes.types=[color,texture,size]'
  q t5-no-texture  -S 'attributes.types=[color,shape,size]'
  q t5-no-size     -S 'attributes.types=[color,shape,texture]'
  q t6a-simple     -S negatives=simple
  q t6a-none       -S negatives=none
  q t6b-pretrain   -S align.paradigm=stage1-only
  q t6b-it         -S align.paradigm=stage2-only
  q t6c-noisy      -S attributes.quality=noisy
  q t6d-short      -S attributes.level=short
  q t6e-upper      -S attributes.construction=ground-truth
  q t6e-tag        -S attributes.construction=tag-based
  q t4-llava       -S model.base=tiny-llava                          # Table 4: both rows (base and + A^3)
  q t4-qwen        -S model.base=tiny-qwen2.5-vl                     # Table 4, beyond the paper: Qwen2.5-VL
  q x-ccc-logsumexp -S align.ccc=logsumexp                           # not in the paper: eq. 7 as written
  # the release's loss and batch forms (docs/forms.md)
  q x-release-ccc -S align.ccc=release                                # the release's eq. 7 alone
  q x-release-sequence -S train.generation_loss=sequence             # the release's loss on every token alone
  q x-release -S align.ccc=release -S align.negatives_scope=batch -S align.temperatures=two -S align.learn_temperature=false -S align.mask_same_class=false -S align.contrastive_batch=device -S align.text_bos=true -S train.generation_loss=sequence -S train.weight_decay=0.01
}

# `dvc queue status` (and `dvc exp show`) ping the worker through celery's file broker, which can
# crash it mid-queue (treeverse/dvc#10428): wait on the worker's process instead. DVC's worker exits
# 60 s after the queue runs empty; if one died early, let the last experiments finish and start again.
worker_alive() {
  local f
  for f in .dvc/tmp/exps/celery/dvc-exp-worker-*.pid; do [[ -f $f ]] && kill -0 "$(cat "$f")" 2>/dev/null && return 0; done
  return 1
}
count() { dvc queue status | grep -cw "$1" || true; }  # grep reads it all: no SIGPIPE under pipefail
run_queue() {
  while :; do
    while worker_alive; do sleep 30; done
    while (( $(count Running) > 0 )); do sleep 30; done
    (( $(count Queued) > 0 )) || break
    OMP_NUM_THREADS=$(( $(nproc) / jobs > 0 ? $(nproc) / jobs : 1 )) dvc queue start -j "$jobs"
    sleep 10
  done
  dvc queue status
}

queue_regimes() {
  local cmds
  cmds=$(finedefics regimes-queue --seeds "$seeds" "${unseen[@]}")  # fails the script on a bad --unseen
  eval "$cmds"
}

if [[ $mode != run ]]; then
  # The committed dvc.lock names models/base by a hash that includes the transformers version written into its
  # config.json; where another version is installed, DVC prefers that lock entry to its run cache and every
  # experiment would pre-train the base again (3 min each). Reproducing the default first records this
  # machine's outputs in the workspace's dvc.lock, which the queued experiments start from.
  dvc repro
  if (( regimes )); then queue_regimes; else queue_all; fi
fi
[[ $mode == queue ]] && exit 0
start=$(date +%s)
run_queue
echo "queue finished: $(( ($(date +%s) - start) / 60 )) min on $(nproc) CPU core(s), $jobs experiment(s) at a time"
finedefics ledger  # the finished experiments and their predictions into reports/ledger/ (commit it with the report)
if (( regimes )); then finedefics report --regimes; else finedefics report; fi
