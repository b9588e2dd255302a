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

# The launchers' config check (`megatiny train --check`, one process) before torchrun: a SIGTERM /
# SIGINT to this script while it runs is relayed to it, it prints one line naming the phase
# ("checking the config"), and the launcher exits 128 + the signal (143, 130) without starting
# torchrun. Otherwise a check that fails ends the launcher with its exit code.
run_check_relaying_signals() {
  local pid got=0 rc
  "$@" &
  pid=$!
  trap 'got=130; kill -INT "$pid" 2>/dev/null || true' INT
  trap 'got=143; kill -TERM "$pid" 2>/dev/null || true' TERM
  while :; do
    rc=0
    wait "$pid" || rc=$?
    kill -0 "$pid" 2>/dev/null || break   # wait returned because the check exited
  done
  trap - INT TERM
  if [ "$got" != 0 ]; then exit "$got"; fi
  if [ "$rc" != 0 ]; then exit "$rc"; fi
}
