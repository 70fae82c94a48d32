#!/bin/sh
# A pretend training run: uses the GPUs DoPQ gave it and writes to /outdir.
echo "job $DOPQ_JOB_ID of $DOPQ_USER on GPUs [$DOPQ_GPUS] (NVIDIA_VISIBLE_DEVICES=$NVIDIA_VISIBLE_DEVICES)"
for epoch in 1 2 3; do
    echo "epoch $epoch: loss 0.$((9 - epoch * 2))"
    sleep 1
done
echo "model weights" > /outdir/model.txt
echo "saved /outdir/model.txt"
