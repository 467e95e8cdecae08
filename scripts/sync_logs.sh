#!/usr/bin/env bash
# Pull a training node's logs/ home every few minutes, and keep doing it while the node comes and goes.
#
#   scripts/sync_logs.sh HOST [REMOTE_DIR] [INTERVAL]
#     HOST        ssh destination (user@1.2.3.4, or a Host from ~/.ssh/config); or @FILE: read the
#                 destination from FILE every round, so a spot node replaced under a new address is
#                 followed by writing the new address into FILE, without restarting this script
#     REMOTE_DIR  the repo's folder on the node (default: gpt2, i.e. ~/gpt2)
#     INTERVAL    seconds between rounds (default: 360)
#
# Only logs/ travels (plots, metrics, samples: small); checkpoints stay on the node. Nothing local is
# ever deleted, so the logs of a node that is gone stay here. Ctrl-C stops it.
set -uo pipefail

if [[ $# -lt 1 || $# -gt 3 || "$1" == "-h" || "$1" == "--help" ]]; then
    sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
HOST_ARG=$1
REMOTE_DIR=${2:-gpt2}
INTERVAL=${3:-360}
LOCAL_DIR=${LOCAL_DIR:-logs}
# BatchMode: never hang on a password prompt. A replacement spot node often comes back at the same
# address with a new host key, which would stop ssh for good: host keys are not remembered (this only
# pulls log files, over your own key). Set RSYNC_RSH to use your own ssh options instead.
RSH=${RSYNC_RSH:-"ssh -o BatchMode=yes -o ConnectTimeout=15 -o ServerAliveInterval=15 -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR"}
mkdir -p "$LOCAL_DIR"

while true; do
    host=$HOST_ARG
    if [[ $host == @* ]]; then
        host=$(head -n 1 "${host#@}" 2>/dev/null | tr -d '[:space:]')
    fi
    if [[ -z $host ]]; then
        echo "$(date '+%F %T') no host to sync from (is ${HOST_ARG#@} empty?); retrying in ${INTERVAL}s" >&2
    elif rsync -az --timeout=120 -e "$RSH" "$host:$REMOTE_DIR/logs/" "$LOCAL_DIR/"; then
        echo "$(date '+%F %T') synced $host:$REMOTE_DIR/logs/ -> $LOCAL_DIR/"
    else
        echo "$(date '+%F %T') could not reach $host (rsync exit $?); keeping local logs, retrying in ${INTERVAL}s" >&2
    fi
    [[ ${SYNC_ONCE:-0} == 1 ]] && break
    sleep "$INTERVAL"
done
