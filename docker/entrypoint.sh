#!/usr/bin/env bash
# Container entry: with SSH_AUTHORIZED_KEYS (a file) start sshd so a launcher in another container can reach this
# one; with SSH_PRIVATE_KEY (a file) use it to reach the others. Then run the command (default: the demo).
set -euo pipefail
if [ -n "${SSH_AUTHORIZED_KEYS:-}" ]; then
  install -m 600 "$SSH_AUTHORIZED_KEYS" /root/.ssh/authorized_keys
  ssh-keygen -A >/dev/null
  /usr/sbin/sshd
fi
if [ -n "${SSH_PRIVATE_KEY:-}" ]; then
  install -m 600 "$SSH_PRIVATE_KEY" /root/.ssh/id_ed25519
fi
exec "$@"
