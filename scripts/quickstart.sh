#!/usr/bin/env bash
# The quickstart: set up, train the `small` encoder-decoder on Multi30k on the CPU, test it, translate a sentence.
#   bash scripts/quickstart.sh [DATA]
# DATA: a hub dataset id (default bentrevett/multi30k) or a local directory of {split}.de.gz/{split}.en.gz files,
# e.g. ../shared/data/multi30k (splits train, val, test_2016_flickr). MAX_TIME (default 00:00:14:00) bounds training.
set -euo pipefail
cd "$(dirname "$0")/.."
data=${1:-bentrevett/multi30k}
bash scripts/setup.sh
. .venv/bin/activate
splits=()
if [ -d "$data" ]; then
  [ -e "$data/val.de.gz" ] || [ -e "$data/val.de" ] && splits+=(--data.val_split val)
  [ -e "$data/test_2016_flickr.de.gz" ] || [ -e "$data/test_2016_flickr.de" ] && splits+=(--data.test_split test_2016_flickr)
fi
translator fit --config configs/quickstart.yaml --data.path "$data" "${splits[@]}" --trainer.max_time "${MAX_TIME:-00:00:14:00}"
# the weights of the best validation loss (the recipe's ModelCheckpoint), not the last ones: at this budget a few
# dozen steps can move test BLEU by 3 points (docs/results.md)
best=$(python -c 'from translator.checkpoint import best_of; print(best_of("checkpoints/quickstart/last.ckpt"))')
translator test --config configs/quickstart.yaml --data.path "$data" "${splits[@]}" --ckpt_path "$best" --trainer.logger false \
  --trainer.precision 32-true  # decode in float32, as scripts/translate.py does
python scripts/translate.py --checkpoint "$best" --beam 5 \
  "Ein Mann mit einem roten Hut fährt Fahrrad." "Zwei Hunde spielen im Schnee."
