#!/usr/bin/env bash
# A real S3 server on this machine for the tests and for trying hvdtrain with object storage: Ceph's S3 gateway
# (radosgw) on a single-node Ceph cluster (one monitor, one OSD on memory-backed storage, authentication off,
# pools of size 1), listening on 127.0.0.1 only, without systemd. Debian 12 packages: ceph-mon ceph-osd radosgw
# python3-rados.
#
#   scripts/s3_server.sh start DIR [PORT]   start it in DIR (state, logs), print the environment to use it
#   scripts/s3_server.sh stop DIR           stop every daemon started in DIR
#   scripts/s3_server.sh bucket DIR NAME    create a bucket (an S3 PUT signed with AWS Signature V4)
#
# The S3 endpoint is http://127.0.0.1:PORT (default 7480) with the access key and secret printed by start (also in
# DIR/env). Nothing is written outside DIR; nothing survives stop (the OSD's storage is memory).
set -euo pipefail

cmd=${1:?usage: s3_server.sh start|stop DIR [PORT]}
dir=${2:?usage: s3_server.sh start|stop DIR [PORT]}
conf=$dir/ceph.conf
access_key=hvdtrain-test-key
secret_key=hvdtrain-test-secret
log() { printf '[s3_server] %s\n' "$*" >&2; }

stop() {
  for pidfile in "$dir"/run/*.pid; do
    [ -e "$pidfile" ] || continue
    pid=$(cat "$pidfile")
    kill "$pid" 2>/dev/null || true
  done
  for pidfile in "$dir"/run/*.pid; do
    [ -e "$pidfile" ] || continue
    pid=$(cat "$pidfile")
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$pidfile"
  done
}

if [ "$cmd" = stop ]; then
  stop
  log "stopped ($dir)"
  exit 0
fi
if [ "$cmd" = bucket ]; then
  name=${3:?usage: s3_server.sh bucket DIR NAME}
  here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  python=${PYTHON:-$here/.venv/bin/python}
  [ -x "$python" ] || python=python3
  # shellcheck disable=SC1091
  . "$dir/env"
  PYTHONPATH=$here${PYTHONPATH:+:$PYTHONPATH} "$python" -m hvdtrain.s3 create-bucket "$name"
  exit 0
fi
[ "$cmd" = start ] || { log "unknown command '$cmd': use start, stop or bucket"; exit 2; }
port=${3:-7480}
mon_port=$((port + 1))
for tool in ceph-mon ceph-osd radosgw radosgw-admin monmaptool; do
  command -v "$tool" >/dev/null || { log "$tool is missing: apt-get install ceph-mon ceph-osd radosgw"; exit 1; }
done

mkdir -p "$dir"/{run,log,mon,osd,rgw}
fsid=$(cat /proc/sys/kernel/random/uuid)
cat > "$conf" <<EOF
[global]
fsid = $fsid
mon host = v1:127.0.0.1:$mon_port
mon initial members = a
public addr = 127.0.0.1
ms bind ipv6 = false
auth cluster required = none
auth service required = none
auth client required = none
osd pool default size = 1
osd pool default min size = 1
osd crush chooseleaf type = 0
mon allow pool size one = true
mon warn on pool no redundancy = false
run dir = $dir/run
pid file = $dir/run/\$name.pid
admin socket = $dir/run/\$name.asok
log file = $dir/log/\$name.log
mon data = $dir/mon/\$name
osd data = $dir/osd/\$name
osd objectstore = memstore
memstore device bytes = 2147483648
# the OSD's place in the CRUSH map is set below by mon_command: its own update at start is a monitor command that
# can lose the race mon_command describes
osd crush update on start = false
osd class update on start = false
osd max object name len = 460
osd max object namespace len = 64
keyring = $dir/keyring
[client.rgw.a]
rgw frontends = beast endpoint=127.0.0.1:$port
rgw data = $dir/rgw
rgw enable usage log = false
EOF

# A daemon that fails writes why to its log file, not to stderr: on any failed step, print each log's last lines and
# stop what started (a start in CI once failed after "starting the monitor" with nothing else to read).
failed() {
  local status=$?
  log "failed (exit $status) at line $1; the daemons' logs in $dir/log end with:"
  for f in "$dir"/log/*; do [ -s "$f" ] && { printf -- '--- %s\n' "$f" >&2; tail -n 15 "$f" >&2; }; done
  stop
  exit "$status"
}
trap 'failed $LINENO' ERR

# A monitor command, sent once the client holds the monitor's map. Ceph 16's clients (the `ceph` CLI, librados)
# start from a map without the cluster's fsid and learn it from the monitor's reply to their subscription; a command
# sent before that reply is refused as "wrong fsid" (EPERM). On a loaded machine the command wins that race: CI's
# starts failed at their first `ceph` command, both times, with "problem getting command descriptions from mon". So
# the command goes through librados (python3-rados, which the ceph CLI uses too) after the fsid has arrived.
mon_command() {
  /usr/bin/python3 - "$conf" "$1" <<'PY'
import sys
import time

import rados

conf, command = sys.argv[1:]
cluster = rados.Rados(conffile=conf)
cluster.connect(timeout=30)
deadline = time.monotonic() + 30
while cluster.get_fsid() == "00000000-0000-0000-0000-000000000000" and time.monotonic() < deadline:
    time.sleep(0.05)
ret, out, err = cluster.mon_command(command, b"", timeout=30)
cluster.shutdown()
if ret != 0:
    sys.exit(f"{command}: {err} (error {ret})")
print(out.decode().strip())
PY
}

log "starting the monitor"
ceph-authtool --create-keyring "$dir/keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
monmaptool --create --add a "v1:127.0.0.1:$mon_port" --fsid "$fsid" "$dir/monmap" >/dev/null
ceph-mon -c "$conf" -i a --mkfs --monmap "$dir/monmap" --keyring "$dir/keyring"
# Its start is retried as the OSD's is (below): a monitor refused at start leaves nothing behind to stop.
for attempt in 1 2 3; do
  if ceph-mon -c "$conf" -i a 2>"$dir/log/mon-start.err"; then break; fi
  if [ "$attempt" = 3 ]; then cat "$dir/log/mon-start.err" >&2; false; fi
  log "the monitor stopped at start (attempt $attempt, see $dir/log/mon.a.log); starting it again"
  sleep "$attempt"
done

log "starting the OSD (memory-backed)"
# The OSD's own uuid, given to the monitor and to the OSD's mkfs alike (Ceph's manual deployment, "long form"):
# created without one, the map's osd.0 had none and the OSD's start could be refused as "wrong fsid", 8 times in a
# row on 2026-12-07 (EPERM from its first mon command, `osd create` with the uuid its mkfs drew).
osd_uuid=$(cat /proc/sys/kernel/random/uuid)
osd_id=$(mon_command "{\"prefix\": \"osd create\", \"uuid\": \"$osd_uuid\"}")
mon_command "{\"prefix\": \"osd crush add\", \"id\": $osd_id, \"weight\": 1.0, \"args\": [\"host=localhost\", \"root=default\"]}" >/dev/null
mkdir -p "$dir/osd/osd.$osd_id"
ceph-osd -c "$conf" -i "$osd_id" --mkfs --osd-uuid "$osd_uuid" >/dev/null 2>&1
# Should a start still fail (the monitor's client racing its first command), starting it again is harmless: up to 8
# attempts, waiting longer each time.
for attempt in 1 2 3 4 5 6 7 8; do
  if ceph-osd -c "$conf" -i "$osd_id" 2>"$dir/log/osd-start.err"; then break; fi
  if [ "$attempt" = 8 ]; then cat "$dir/log/osd-start.err" >&2; false; fi
  log "the OSD stopped at start (attempt $attempt, see $dir/log/osd.$osd_id.log); starting it again"
  sleep "$attempt"
done

log "starting the S3 gateway on 127.0.0.1:$port"
radosgw -c "$conf" -n client.rgw.a
for _ in $(seq 300); do
  if radosgw-admin -c "$conf" user info --uid=hvdtrain >/dev/null 2>&1 \
     || radosgw-admin -c "$conf" user create --uid=hvdtrain --display-name=hvdtrain --access-key="$access_key" \
          --secret-key="$secret_key" >/dev/null 2>&1; then
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      break
    fi
  fi
  sleep 0.2
done
(exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null || { log "the gateway did not answer on port $port; see $dir/log"; stop; exit 1; }

cat > "$dir/env" <<EOF
export S3_ENDPOINT=http://127.0.0.1:$port
export S3_USE_HTTPS=0
export S3_VERIFY_SSL=0
export AWS_ACCESS_KEY_ID=$access_key
export AWS_SECRET_ACCESS_KEY=$secret_key
export AWS_REGION=us-east-1
export AWS_EC2_METADATA_DISABLED=true
EOF
trap - ERR
cat "$dir/env"
log "ready: http://127.0.0.1:$port (source $dir/env)"
