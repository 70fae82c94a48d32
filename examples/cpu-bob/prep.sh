#!/bin/sh
echo "bob's CPU-only preprocessing (job $DOPQ_JOB_ID, GPUs [$DOPQ_GPUS])"
i=0; while [ $i -lt 5 ]; do echo "chunk $i"; i=$((i + 1)); done
exit 0
