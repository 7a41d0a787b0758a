#!/usr/bin/env bash
# Host discovery for elastic training (horovodrun --host-discovery-script): prints one "host:slots" per line.
# With HOSTS_FILE set, prints that file (edit it while the job runs to add or remove hosts). Otherwise it lists
# this machine under two names, localhost:1 and 127.0.0.1:1: Horovod blacklists a failed worker's whole *host*,
# so two names let the surviving rank go on when the other dies (see docs/reliability.md).
set -euo pipefail
if [ -n "${HOSTS_FILE:-}" ]; then
  grep -v '^[[:space:]]*\(#\|$\)' "$HOSTS_FILE" || true
else
  printf 'localhost:1\n127.0.0.1:1\n'
fi
