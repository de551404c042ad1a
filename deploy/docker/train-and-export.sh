#!/bin/sh
# The trainer container's job: train the models and publish them to the repository,
# once. A second `docker compose up` finds the checkpoints and the published versions
# and exits at once (--skip-existing), so serving starts without retraining.
set -eu
REPO=${CNNSERVE_REPO:-/models}
RUNS=${TRAIN_RUNS:-/runs}
# shellcheck disable=SC2086  # TRAIN_MODELS and TRAIN_ARGS are word lists on purpose
python -m training --preset "${TRAIN_PRESET:-quick}" --model ${TRAIN_MODELS:-lenet alexnet vgg11_bn} \
    --device "${TRAIN_DEVICE:-auto}" --out "$RUNS" --no-progress --skip-existing ${TRAIN_ARGS:-}
python -m export --all "$RUNS" --repo "$REPO" --fp16 --skip-existing
