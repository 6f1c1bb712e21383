#!/usr/bin/env bash
# The README's reference run: the CPU smoke configuration on the data in ./data (the fineweb_mini kit here),
# then its log and metadata become the top-level train.log and submission.json. Rerun after every change to
# train_gpt.py (tests/test_submission_files.py checks that they match the code).
set -euo pipefail
cd "$(dirname "$0")/.."
RUN_ID=reference OVERWRITE=1 NUM_LAYERS=4 MODEL_DIM=64 NUM_HEADS=4 NUM_KV_HEADS=2 ATTN_POSITIONS=1 NUM_OSCILLATORS=32 \
MLP_MULT=2 BIGRAM_VOCAB_SIZE=1024 BIGRAM_DIM=32 TRAIN_SEQ_LEN=128 TRAIN_BATCH_TOKENS=8192 ITERATIONS=30 \
WARMDOWN_ITERS=10 MAX_WALLCLOCK_SECONDS=0 VAL_LOSS_EVERY=0 TRAIN_LOG_EVERY=10 WARMUP_STEPS=2 VAL_BATCH_SIZE=16384 \
EVAL_STRIDE=0 TTT_ENABLED=0 RUN_NAME="TRN hybrid, CPU reference run (smoke configuration)" \
BLURB="Not a record, 30 steps of a 4-layer width-64 hybrid on CPU, scored on the fineweb_mini kit's validation shard (the first 901 documents of the official split), artifact reloaded from its bytes" \
python train_gpt.py
cp logs/reference.txt train.log
cp logs/reference.submission.json submission.json
