#!/usr/bin/env bash
# Train the three architectures on Multi30k on one GPU, then compare their best checkpoints on test2016 (Flickr).
#   bash scripts/compare_architectures.sh [DATA] [OUT]
# DATA: a hub dataset id (default bentrevett/multi30k, whose `test` split is test2016) or a local directory of
#       {split}.de.gz/{split}.en.gz files such as ../shared/data/multi30k (splits train, val, test_2016_flickr).
# OUT:  where scripts/compare.py writes report.md, report.json and the plots (default docs/compare).
# Runs configs/{encdec,decoder_only,decoder_only_causal}.yaml + configs/data/multi30k.yaml + configs/trainer/gpu.yaml;
# each writes checkpoints/<run>/ (best-step=N.ckpt by val/bleu, last.ckpt, metrics.csv), which compare.py reads.
# Environment:
#   SKIP_TRAIN=1       compare the existing checkpoints/<run>/ without training
#   RESUME=1           continue runs that already have a last.ckpt (translator fit --ckpt_path last)
#   FIT_ARGS="..."     more arguments for every `translator fit` (e.g. "--trainer.max_steps 2000")
#   COMPARE_ARGS="..." more arguments for scripts/compare.py (e.g. "--bootstrap 2000 --batch-tokens 8192")
#   TRAINER_CONFIG, DEVICE  default configs/trainer/gpu.yaml and cuda (a CPU smoke run: configs/trainer/cpu.yaml, cpu)
set -euo pipefail

die() { echo "compare_architectures.sh: error: $*" >&2; exit 2; }
case "${1:-}" in -h | --help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;; esac
[ $# -le 2 ] || die "expected at most 2 arguments (DATA OUT), got $#; see --help"

data=${1:-bentrevett/multi30k}
out=${2:-docs/compare}
# paths given relative to the caller's directory stay valid after the cd to the repository below
if [ -d "$data" ]; then data=$(cd "$data" && pwd); fi
if [ $# -ge 2 ] && [ "${out#/}" = "$out" ]; then out="$PWD/$out"; fi
cd "$(dirname "${BASH_SOURCE[0]}")/.."

runs=(encdec decoder_only decoder_only_causal)
trainer_config=${TRAINER_CONFIG:-configs/trainer/gpu.yaml}
device=${DEVICE:-cuda}
read -r -a fit_args <<< "${FIT_ARGS:-}"
read -r -a compare_args <<< "${COMPARE_ARGS:-}"
for f in configs/data/multi30k.yaml "$trainer_config"; do [ -e "$f" ] || die "$f not found"; done
for run in "${runs[@]}"; do [ -e "configs/$run.yaml" ] || die "configs/$run.yaml not found"; done

if [ -d "$data" ]; then
  # a local copy names its splits differently from the hub (see configs/data/multi30k.yaml)
  for split in train val test_2016_flickr; do
    [ -e "$data/$split.de.gz" ] || [ -e "$data/$split.de" ] || die "$data has no $split.de[.gz]"
  done
  data_args=(--data.path "$data" --data.val_split val --data.test_split test_2016_flickr)
  testset="test2016=$data:test_2016_flickr"
elif [ -e "$data" ]; then
  die "$data is not a directory (expected a hub dataset id or a directory of {split}.de.gz/{split}.en.gz files)"
else
  data_args=(--data.path "$data")
  testset="test2016=$data:test"
fi

if [ "$device" = cuda ] && ! python3 -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  die "no CUDA device: this script trains on a GPU (for a CPU smoke run set TRAINER_CONFIG=configs/trainer/cpu.yaml DEVICE=cpu)"
fi

checkpoints=()
for run in "${runs[@]}"; do
  dir=checkpoints/$run  # the configs' ModelCheckpoint dirpath and CSVLogger save_dir/name
  if [ "${SKIP_TRAIN:-0}" != 1 ]; then
    resume=()
    if [ -e "$dir/last.ckpt" ]; then
      [ "${RESUME:-0}" = 1 ] || die "$dir already holds a run: RESUME=1 continues it, SKIP_TRAIN=1 compares it as is, or move it away"
      resume=(--ckpt_path last)
    fi
    echo "== training $run" >&2
    translator fit --config "configs/$run.yaml" --config configs/data/multi30k.yaml --config "$trainer_config" \
      "${data_args[@]}" ${fit_args[@]+"${fit_args[@]}"} ${resume[@]+"${resume[@]}"}
  fi
  best=""
  for f in "$dir"/best*.ckpt; do  # the newest: a stale best from an earlier run in the same directory is older
    if [ -e "$f" ] && { [ -z "$best" ] || [ "$f" -nt "$best" ]; }; then best=$f; fi
  done
  [ -n "$best" ] || die "no best*.ckpt in $dir (the configs' ModelCheckpoint saves best-step=N.ckpt by val/bleu)"
  echo "== $run: $best" >&2
  checkpoints+=("$best")
done

python3 scripts/compare.py --checkpoints "${checkpoints[@]}" --names "${runs[@]}" --testset "$testset" \
  --device "$device" --beam 5 --out "$out" ${compare_args[@]+"${compare_args[@]}"}
echo "== report: $out/report.md" >&2
