# Sourced by the launchers: run torchrun so that SIGTERM / SIGINT reach the training ranks once.
#
# torchrun answers a signal by signalling its workers again and printing its own traceback; a
# rank that gets the same signal twice would exit without saving. So torchrun runs in its own
# session (Ctrl-C at the terminal does not reach it) and this shell relays each signal to the
# ranks only (torchrun's child processes). The ranks save and exit 0, torchrun exits quietly, and
# the launcher exits 128 + the signal number. A second signal is relayed too: the ranks stop at once.
run_relaying_signals() {
  local pid got=0 rc
  setsid "$@" &
  pid=$!
  relay() {
    got=$1   # rank 0 says what happens, in one line
    pkill "-$([ "$got" = 130 ] && echo INT || echo TERM)" -P "$pid" || true
  }
  trap 'relay 130' INT
  trap 'relay 143' TERM
  while :; do
    rc=0
    wait "$pid" || rc=$?
    kill -0 "$pid" 2>/dev/null || break   # wait returned because torchrun exited
  done
  trap - INT TERM
  if [ "$got" != 0 ] && [ "$rc" = 0 ]; then exit "$got"; fi
  exit "$rc"
}
