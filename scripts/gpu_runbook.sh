#!/usr/bin/env bash
# Every GPU measurement the issues ask for, cut into parts that each fit one 10-minute call of the lent H100.
#   bash scripts/gpu_runbook.sh PART [PART ...]     PART: train decode ttb bench-s2s bench-dec tune all
# Writes logs, JSON and reports to $RESULTS (default out/gpu). When $OUT is set (the device tool's folder that comes
# back, at most 8 files), everything new under $RESULTS is also packed into $OUT/gpu-PARTS.tgz at the end.
#
# Parts, in the order that serves the open issues best, with their time caps (a part never runs over its cap: each
# command has a `timeout`, and partial results stay):
#   train      (~9 min) the architecture study's GPU column: ARMS (default encdec, causal, prefix-rope-restart) at base
#              size (bf16, TRAIN_TIME each, default 00:00:02:30), then scripts/compare.py on test2016 -> compare/report/
#   decode     (~5 min) issue #5: scripts/bench_decode.py, random-init base models against HF generate(), greedy
#              and beam 5, dynamic and CUDA-graph search; with the train part's checkpoints when present
#   ttb        (~5 min) issue #8: scripts/time_to_bleu.py, the encdec recipe until test2016 greedy BLEU >= 41.3
#   bench-s2s, bench-dec (~9 min each) issue #8: scripts/bench_train.py for one architecture, every variant at the
#              recipe's 8192 and at 65536 tokens, the eager/HF/Lightning variants at 4096, 16384 and 131072
#   tune       (~9 min) issue #4's "hyper-parameters tuned on the GPU": four encdec recipe variants (lr, warmup,
#              dropout, batch), 100 s of training each, greedy *validation* BLEU every 10 s (the test set untouched)
#
# On the device machine (which has no `datasets`/`jsonargparse` and no ../shared), from this repository:
#   here, once:   bash scripts/fetch_wheels.sh && mkdir -p .data && cp -r ../shared/data/multi30k .data/
#   device call:  carry [".whl", ".data"], command:
#     python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
#       .whl/*.whl && export PYTHONPATH=/tmp/site || exit; bash scripts/gpu_runbook.sh train
#   The cached tokenizer (checkpoints/tokenizers/) may travel too (carry it) to save its ~20 s of training.
# DRY_RUN=1 prints the commands without running them; EXTRA_FIT_ARGS adds arguments to the train part's fits
# (tests/test_compare.py runs scripts/compare_architectures.sh --quick on CPU with tiny models).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

DEVICE_OUT=${OUT:-}
OUT=${RESULTS:-out/gpu}
DATA=${DATA:-}
TRAIN_TIME=${TRAIN_TIME:-00:00:02:30}
ARMS=${ARMS:-encdec causal prefix-rope-restart}
mkdir -p "$OUT"
if [ -n "$DEVICE_OUT" ]; then
  # checkpoints stay behind: a base-size one is hundreds of MB, over what comes back from the device
  trap 'tar czf "$DEVICE_OUT/gpu-$(IFS=-; echo "$*").tgz" --exclude="*.ckpt" "$OUT"; cp "$OUT/runbook.log" "$DEVICE_OUT/"' EXIT
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# the scripts default to ../shared/data/multi30k; on the device the data travels as .data/multi30k
if [ -z "$DATA" ]; then
  if [ -d ../shared/data/multi30k ]; then DATA=../shared/data/multi30k; else DATA=.data/multi30k; fi
fi
[ -e "$DATA/train.de.gz" ] || { echo "gpu_runbook.sh: error: no Multi30k under $DATA (set DATA)" >&2; exit 2; }
if [ ! -e ../shared/data/multi30k ]; then mkdir -p ../shared/data && ln -sfn "$(cd "$DATA" && pwd)" ../shared/data/multi30k; fi
translator() { python3 -m translator.cli "$@"; }  # the console script needs `pip install -e .`
export -f translator

run() {  # run CAP_SECONDS LOG_NAME COMMAND...: time-capped, logged, never aborting the part
  local cap=$1 name=$2
  shift 2
  echo "== $(date +%T) $name: $*" | tee -a "$OUT/runbook.log"
  [ "${DRY_RUN:-0}" = 1 ] && return
  timeout --signal=TERM --kill-after=20 "$cap" "$@" > >(tee "$OUT/$name.log") 2>&1
  echo "== $(date +%T) $name: exit $?" | tee -a "$OUT/runbook.log"
}

part_train() {
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
  # the study's arms (ARMS) at base size (26.2M parameters each), TRAIN_TIME each; the curves stay in the runs' folders
  run 570 train bash scripts/compare_architectures.sh --data "$DATA" --out "$OUT/compare" --device cuda --seeds 0 \
    --arms "$ARMS" \
    --recipe configs/compare/cpu.yaml --recipe configs/compare/gpu.yaml --compare "--bootstrap 1000" \
    --fit "--trainer.max_time $TRAIN_TIME ${EXTRA_FIT_ARGS:-}"
}

part_decode() {
  local ckpts=()
  for run in encdec prefix; do  # the train part's checkpoints
    local last=$OUT/compare/runs/$run-seed0/checkpoints/run/last.ckpt
    [ -e "$last" ] && ckpts+=("$(python3 -c 'import sys; from translator.checkpoint import best_of
print(best_of(sys.argv[1]))' "$last")")
  done
  run 300 bench_decode python3 scripts/bench_decode.py --beams 1 5 --static no yes --json "$OUT/bench_decode.json" \
    ${ckpts[@]+--checkpoint "${ckpts[@]}"}
}

part_ttb() {
  run 300 time_to_bleu python3 scripts/time_to_bleu.py --data "$DATA" --json "$OUT/time_to_bleu.json"
}

part_tune() {
  local variants=(
    "base::"
    "lr2e-3_wu400::--model.init_args.lr 2e-3 --model.init_args.warmup_steps 400"
    "wu400_do0.3::--model.init_args.warmup_steps 400 --model.init_args.config.dropout 0.3"
    "lr2e-3_wu400_16k::--model.init_args.lr 2e-3 --model.init_args.warmup_steps 400 --max-tokens 16384"
  )
  for v in "${variants[@]}"; do
    local name=${v%%::*} extra
    read -r -a extra <<< "${v#*::}"
    run 140 "tune_$name" python3 scripts/time_to_bleu.py --data "$DATA" --test-split val --target 100 \
      --max-seconds 100 --eval-every-seconds 10 --beam 1 ${extra[@]+"${extra[@]}"} --json "$OUT/tune_$name.json"
  done
}

part_bench() {  # part_bench ARCH
  run 330 "bench_$1_main" python3 scripts/bench_train.py --archs "$1" --tokens 8192 65536 \
    --variants eager compile reduce-overhead lightning lightning-compile lightning-graphs hf --json "$OUT/bench_train_$1_main.json"
  run 200 "bench_$1_sweep" python3 scripts/bench_train.py --archs "$1" --tokens 4096 16384 131072 \
    --variants eager lightning hf --no-sdpa-report --json "$OUT/bench_train_$1_sweep.json"
}

[ $# -ge 1 ] || { sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
for part in "$@"; do
  case $part in
    train) part_train ;;
    decode) part_decode ;;
    ttb) part_ttb ;;
    bench-s2s) part_bench seq2seq ;;
    bench-dec) part_bench decoder_only ;;
    tune) part_tune ;;
    all) part_train; part_decode; part_ttb; part_bench seq2seq; part_bench decoder_only; part_tune ;;
    *) echo "gpu_runbook.sh: error: unknown part $part (train decode ttb bench-s2s bench-dec tune all)" >&2; exit 2 ;;
  esac
done
