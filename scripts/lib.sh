# Shared by the GPU scripts (source it: `. "$(dirname "$0")/lib.sh"`). Needs $out (the log folder) set first.
#
# step NAME CMD...: run CMD with its output in $out/NAME.log, print the log's last $TAIL lines (default 3) and the
# exit status, and set status=1 if it failed. STEP_TIMEOUT (seconds) bounds each step when set.
status=${status:-0}
step() {
    local name=$1
    shift
    echo "== $name: $*"
    if [ -n "${STEP_TIMEOUT:-}" ]; then
        timeout "$STEP_TIMEOUT" "$@" > "$out/$name.log" 2>&1
    else
        "$@" > "$out/$name.log" 2>&1
    fi
    local rc=$?
    tail -n "${TAIL:-3}" "$out/$name.log"
    echo "== $name: exit $rc"
    [ "$rc" -eq 0 ] || status=1
}
