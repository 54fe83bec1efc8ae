#!/bin/sh
# Stand-in for a real disk erase: only prints and sleeps.
machine="$2"
echo "erasing disks of $machine (idempotency key $STEWARD_IDEMPOTENCY_KEY)"
sleep 2
echo "$machine: erased"
