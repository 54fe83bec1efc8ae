#!/bin/sh
# Sends what is due, continuing where the last run stopped.
#
# Each file in OUTBOX is one message. A message moves to OUTBOX/../sent only after it was
# sent, so a run that is killed, stopped by the e-stop or times out leaves the rest in the
# outbox, and the next fire of the schedule picks up exactly there. Sending one message twice
# is avoided by its name: a message already in sent/ is not sent again (its move may be what
# the last run did not finish).
set -eu
outbox=${OUTBOX:?set OUTBOX to the outbox directory}
sent="$outbox/../sent"
mkdir -p "$outbox" "$sent"
n=0
for msg in "$outbox"/*; do
    [ -f "$msg" ] || continue
    name=$(basename "$msg")
    if [ -e "$sent/$name" ]; then
        rm -f "$msg"
        continue
    fi
    # The real send goes here (curl, sendmail, an API client); this example prints it.
    echo "sending $name: $(head -c 200 "$msg")"
    mv "$msg" "$sent/$name"
    n=$((n + 1))
done
echo "sent $n message(s)"
