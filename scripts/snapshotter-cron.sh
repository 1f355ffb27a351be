#!/usr/bin/env bash
# Scheduled snapshot, then retention: for cron or a systemd timer.
#
# Quiet when everything worked; on failure exactly one line on stderr (cron
# mails it, journald keeps it) and snapshotter's exit code (see the README's
# table: 4 = locked, 3 = integrity, 130 = interrupted, ...).
#
# Settings, from the environment (an EnvironmentFile under systemd):
#   SNAPSHOTTER_CONFIG              config file (default: ./snapshotter.toml)
#   SNAPSHOTTER_CRON_RELEASE        the agent release to snapshot, or
#   SNAPSHOTTER_CRON_RELEASE_FILE   a file holding it (written by your deploy)
#   SNAPSHOTTER_CRON_KEEP           forget policy (default below); empty: no forget
#   SNAPSHOTTER_CRON_METRICS_DIR    node_exporter textfile folder; empty: no metrics
#   SNAPSHOTTER_CRON_LOCK_WAIT      seconds to wait for a lock held by prune or a restore (default 600)
#   SNAPSHOTTER_CRON_PRUNE          1: prune after forget (takes the exclusive lock; a daily timer is better)
#   SNAPSHOTTER_CRON_BIN            the snapshotter command (default: snapshotter)
set -u

BIN=${SNAPSHOTTER_CRON_BIN:-snapshotter}
DEFAULT_KEEP="--keep-hourly 48 --keep-daily 14 --keep-weekly 8 --keep-monthly 12"
KEEP=${SNAPSHOTTER_CRON_KEEP-$DEFAULT_KEEP}
METRICS_DIR=${SNAPSHOTTER_CRON_METRICS_DIR-/var/lib/node_exporter/textfile_collector}
LOCK_WAIT=${SNAPSHOTTER_CRON_LOCK_WAIT:-600}

fail() {
    echo "snapshotter-cron: $*" >&2
}

release=${SNAPSHOTTER_CRON_RELEASE:-}
if [ -z "$release" ] && [ -n "${SNAPSHOTTER_CRON_RELEASE_FILE:-}" ]; then
    release=$(head -n 1 "$SNAPSHOTTER_CRON_RELEASE_FILE" 2>/dev/null | tr -d '[:space:]')
fi
if [ -z "$release" ]; then
    fail "no release: set SNAPSHOTTER_CRON_RELEASE or SNAPSHOTTER_CRON_RELEASE_FILE"
    exit 2
fi

errfile=$(mktemp "${TMPDIR:-/tmp}/snapshotter-cron.XXXXXX") || exit 1
child=
# forward a stop to snapshotter, which releases its locks and exits 130
trap '[ -n "$child" ] && kill -TERM "$child" 2>/dev/null' TERM INT
trap 'rm -f "$errfile"' EXIT

# run STEP ARGS...: snapshotter quietly; on failure one line naming the step and the error
run() {
    local step=$1 code
    shift
    local metrics=()
    if [ -n "$METRICS_DIR" ]; then
        metrics=(--metrics-file "$METRICS_DIR/snapshotter-$step.prom")
    fi
    # shellcheck disable=SC2086  # BIN may be a command with arguments
    $BIN --quiet --no-progress --lock-wait "$LOCK_WAIT" ${metrics[@]+"${metrics[@]}"} "$@" >/dev/null 2>"$errfile" &
    child=$!
    wait "$child"
    code=$?
    if kill -0 "$child" 2>/dev/null; then  # wait was cut short by a signal: collect the real status
        wait "$child"
        code=$?
    fi
    child=
    if [ "$code" -ne 0 ]; then
        fail "$step failed (exit $code): $(grep -v '^[[:space:]]*$' "$errfile" | tail -n 1 | sed 's/^snapshotter: //')"
    fi
    return "$code"
}

run snapshot snapshot --release "$release" || exit $?
if [ -n "$KEEP" ]; then
    # shellcheck disable=SC2086  # the policy is a list of flags
    run forget forget $KEEP || exit $?
fi
if [ "${SNAPSHOTTER_CRON_PRUNE:-0}" = 1 ]; then
    run prune prune || exit $?
fi
exit 0
