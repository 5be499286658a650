#!/usr/bin/env bash
# The architecture study: train every arm for every seed with one recipe, then compare their best checkpoints
# (scripts/compare.py: mean ± sd per arm, paired bootstrap arm against arm, curves with seed bands). docs/comparison.md
# gives the results and the commands.
#   bash scripts/compare_architectures.sh [options]
# Options:
#   --data D     a local directory of {split}.de.gz/{split}.en.gz (splits train, val, test_2016_flickr), default
#                ../shared/data/multi30k, or a hub dataset id such as bentrevett/multi30k (its `test` split is test2016)
#   --out DIR    runs go to DIR/runs/ARM-seedN (default out/compare)
#   --report R   scripts/compare.py's report folder (default DIR/report)
#   --recipe F   the recipe every arm shares (default configs/compare/cpu.yaml: d 128, early stopping on val/loss);
#                repeat it to layer configs, e.g. --recipe configs/compare/cpu.yaml --recipe configs/compare/gpu.yaml
#   --arms "A B" arms to train (default "encdec causal prefix"); the variants are listed below
#   --seeds "S"  seeds (default "0 1 2"); each run passes --seed_everything S --data.seed S
#   --steps N    stop every run after N steps (default: the recipe's, i.e. when validation stops improving)
#   --device D   cpu or cuda (default cpu), for training and for the comparison
#   --fit "ARGS" more `translator fit` arguments for every run; --compare "ARGS" more scripts/compare.py arguments
#   --train-only train (or resume) the runs and stop before the comparison
#   --quick      tiny models, 4 steps, 2 seeds, 20 test pairs: the test suite's check that the study runs end to end
# Arms (each a switch over the recipe's model; the decoder-only arms have 7 layers, the enc-dec 3+3: equal parameters):
#   encdec, causal (the plain src <sep> tgt recipe), prefix (prefix-LM: bidirectional source);
#   causal-4l, prefix-4l (4 layers: about the enc-dec's training FLOPs per pair);
#   prefix-segments (source/target embeddings), prefix-restart (target positions restart at <sep>),
#   prefix-rope, prefix-rope-restart (RoPE, without and with the restart), prefix-srcloss (source denoising, weight 0.5),
#   prefix-srcloss-separate (the same denoising in a second pass over the source alone: the target reads it clean)
# A run that finished (DIR/runs/ARM-seedN/done) is kept; one that was interrupted continues from its last.ckpt. So the
# same command resumes an interrupted study, and adding seeds or arms trains only the new runs. A run that stopped at
# a smaller --steps cap (not by early stopping) continues to the new cap: a larger --steps carries the study on.
set -euo pipefail

die() { echo "compare_architectures.sh: error: $*" >&2; exit 2; }
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
data=$root/../shared/data/multi30k out=out/compare recipes=()
arms="encdec causal prefix" seeds="0 1 2" steps="" device=cpu fit_extra="" compare_extra="" quick=0 train_only=0 report=""
while [ $# -gt 0 ]; do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --quick) quick=1; shift; continue ;;
    --train-only) train_only=1; shift; continue ;;
    --data | --out | --report | --recipe | --arms | --seeds | --steps | --device | --fit | --compare)
      [ $# -ge 2 ] || die "$1 needs a value"
      case "$1" in
        --data) data=$2 ;; --out) out=$2 ;; --report) report=$2 ;; --recipe) recipes+=("$2") ;; --arms) arms=$2 ;; --seeds) seeds=$2 ;;
        --steps) steps=$2 ;; --device) device=$2 ;; --fit) fit_extra=$2 ;; --compare) compare_extra=$2 ;;
      esac
      shift 2 ;;
    *) die "unknown argument $1; see --help" ;;
  esac
done

# the model switches of every arm, over the recipe
decoder=(--model.class_path translator.module.DecoderOnlyModule)
prefix=("${decoder[@]}" --model.init_args.config.prefix_mode bidirectional)
arm_args() {
  local c=--model.init_args.config
  case "$1" in
    encdec) ;;
    causal) echo "${decoder[@]}" $c.prefix_mode causal ;;
    prefix) echo "${prefix[@]}" ;;
    causal-4l) echo "${decoder[@]}" $c.prefix_mode causal $c.n_layers 4 ;;
    prefix-4l) echo "${prefix[@]}" $c.n_layers 4 ;;
    prefix-segments) echo "${prefix[@]}" $c.segment_embeddings true ;;
    prefix-restart) echo "${prefix[@]}" $c.rope_restart true ;;
    prefix-rope) echo "${prefix[@]}" $c.positions rope ;;
    prefix-rope-restart) echo "${prefix[@]}" $c.positions rope $c.rope_restart true ;;
    prefix-srcloss) echo "${prefix[@]}" $c.source_loss 0.5 ;;
    prefix-srcloss-separate) echo "${prefix[@]}" $c.source_loss 0.5 $c.source_loss_separate true ;;
    *) return 1 ;;
  esac
}
for arm in $arms; do arm_args "$arm" > /dev/null || die "unknown arm $arm; see --help for the arms"; done
for seed in $seeds; do [[ $seed =~ ^[0-9]+$ ]] || die "--seeds: $seed is not a non-negative integer"; done
[ -z "$steps" ] || [[ $steps =~ ^[1-9][0-9]*$ ]] || die "--steps: $steps is not a positive integer"
[ ${#recipes[@]} -gt 0 ] || recipes=("$root/configs/compare/cpu.yaml")
configs=()
for f in "${recipes[@]}"; do
  [ -f "$f" ] || die "--recipe: $f not found"
  configs+=(--config "$(cd "$(dirname "$f")" && pwd)/$(basename "$f")")
done
mkdir -p "$out" && out=$(cd "$out" && pwd)
report=${report:-$out/report}

if [ -d "$data" ]; then
  data=$(cd "$data" && pwd)
  for split in train val test_2016_flickr; do
    [ -e "$data/$split.de.gz" ] || [ -e "$data/$split.de" ] || die "--data: $data has no $split.de[.gz]"
  done
  data_args=(--data.path "$data" --data.val_split val --data.test_split test_2016_flickr)
  testset="test2016=$data:test_2016_flickr"
elif [ -e "$data" ]; then
  die "--data: $data is not a directory (expected a hub dataset id or a directory of {split}.de.gz/{split}.en.gz)"
else
  data_args=(--data.path "$data")
  testset="test2016=$data:test"
fi

read -r -a fit_args <<< "$fit_extra"
read -r -a compare_args <<< "$compare_extra"
if [ "$quick" = 1 ]; then
  c=--model.init_args.config
  fit_args=($c.d_model 32 $c.n_heads 2 $c.d_ff 64 --data.vocab_size 500 --trainer.max_steps 4
            --trainer.val_check_interval 2 --trainer.limit_val_batches 2 ${fit_args[@]+"${fit_args[@]}"})
  compare_args=(--limit 20 --beam 2 --bootstrap 50 --examples 1 ${compare_args[@]+"${compare_args[@]}"})
  [ "$seeds" != "0 1 2" ] || seeds="0 1"
fi
[ -z "$steps" ] || fit_args+=(--trainer.max_steps "$steps" --trainer.max_time null)
[ "$device" = cpu ] || fit_args+=(--trainer.accelerator gpu --trainer.devices 1)

checkpoints=() names=()
for seed in $seeds; do
  for arm in $arms; do
    name=$arm-seed$seed run=$out/runs/$arm-seed$seed
    mkdir -p "$run"
    # a finished run that stopped at a step cap below --steps (not by early stopping) trains on to the new cap
    capped=$({ grep -o 'max_steps=[0-9]*` reached' "$run/fit.log" 2> /dev/null || true; } | tail -1 | tr -dc 0-9)
    [ -z "$steps" ] || [ -z "$capped" ] || [ "$capped" -ge "$steps" ] || rm -f "$run/done"
    if [ ! -e "$run/done" ]; then
      resume=()
      [ ! -e "$run/checkpoints/run/last.ckpt" ] || resume=(--ckpt_path last)
      read -r -a model <<< "$(arm_args "$arm")"
      cmd=(translator fit "${configs[@]}" "${data_args[@]}" --data.tokenizer_dir "$out/tokenizers"
           --seed_everything "$seed" --data.seed "$seed" ${model[@]+"${model[@]}"}
           ${fit_args[@]+"${fit_args[@]}"} ${resume[@]+"${resume[@]}"})
      echo "== $(date -u +%H:%M:%S) training $name${resume[*]:+ (resuming)}" >&2
      printf '%q ' "${cmd[@]}" > "$run/command" && echo >> "$run/command"
      (cd "$run" && "${cmd[@]}" >> fit.log 2>&1) || die "training $name failed; see $run/fit.log"
      touch "$run/done"
    fi
    # the best checkpoint by val/loss, also of a run copied from another study and continued (translator.checkpoint)
    last=$run/checkpoints/run/last.ckpt
    [ -e "$last" ] || die "$run has no checkpoint; see $run/fit.log"
    best=$(python3 -c 'import sys; from translator.checkpoint import best_of; print(best_of(sys.argv[1]))' "$last") ||
      die "$run: no best checkpoint (see the error above)"
    checkpoints+=("$best") names+=("$name")
  done
done

if [ "$train_only" = 1 ]; then echo "== $(date -u +%H:%M:%S) trained ${#names[@]} runs (no comparison)" >&2; exit 0; fi
echo "== $(date -u +%H:%M:%S) comparing ${#names[@]} runs" >&2
python3 "$root/scripts/compare.py" --checkpoints "${checkpoints[@]}" --names "${names[@]}" --testset "$testset" \
  --device "$device" --out "$report" ${compare_args[@]+"${compare_args[@]}"}
echo "== report: $report/report.md" >&2
