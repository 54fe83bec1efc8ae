#!/bin/sh
# Stand-in for a real precondition check: confirms the site is marked decommissioned.
echo "checking that site $1 is decommissioned (idempotency key $STEWARD_IDEMPOTENCY_KEY)"
sleep 1
echo "site $1: decommissioned"
