# Sourced by the GPU machine's one-call scripts (device_channel_pack.sh,
# device_default_check.sh) after they set LOG: `step NAME CMD...` runs CMD with its
# output into $LOG between "[NAME]" and "[NAME rc=... in ... s]", so one log tells each
# step's outcome and time and a failing step does not stop the call.
step() {
  local name=$1 t0=$SECONDS
  shift
  echo "[$name]" >> "$LOG"
  "$@" >> "$LOG" 2>&1
  echo "[$name rc=$? in $((SECONDS - t0)) s]" >> "$LOG"
}
