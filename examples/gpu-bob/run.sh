#!/bin/sh
echo "bob's two-GPU job $DOPQ_JOB_ID: GPUs [$DOPQ_GPUS]"
sleep 2
echo "done"
