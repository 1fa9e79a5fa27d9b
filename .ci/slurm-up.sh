#!/usr/bin/env bash
# Bring up a real, local two-node SLURM cluster on this machine (CI helper).
#
#   sudo .ci/slurm-up.sh            # install (if needed), configure, start, verify
#
# Target: bare Debian 12 (bookworm), run as root, no systemd.  Idempotent: a
# second run reuses healthy daemons when the generated config is unchanged,
# otherwise restarts them cleanly.  The daemons are left running in the
# background when the script exits.  Exits non-zero (after dumping the
# daemon logs) if any verification step fails.
#
# Layout: one slurmctld + two slurmd (n1, n2) on 127.0.0.1, ports 17001/17002,
# one partition "debug" (both nodes, default).  See DEVELOPERS.md.
#
# Environment knobs (all optional):
#   SLURM_CI_SKIP_INSTALL=1   never call apt-get (fail if binaries are missing)
#   SLURM_CI_SKIP_VERIFY=1    skip the test jobs at the end (not recommended)
#   SLURM_CI_RESTART=1        always restart the daemons, even if healthy
#   SLURM_CI_KEEP_STATE=1     on restart keep the saved job queue (default: wipe)
#   SLURM_CI_CPUS=1           CPUs per virtual node (default 1)
#   SLURM_CI_TIMEOUT=120      seconds allowed for each wait (node up, job done)

set -Eeuo pipefail

T0=$(date +%s)
CPUS_PER_NODE=${SLURM_CI_CPUS:-1}
WAIT=${SLURM_CI_TIMEOUT:-120}

CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
LOG_DIR=/var/log/slurm
CTLD_STATE=/var/spool/slurmctld
SLURMD_SPOOL=/var/spool/slurmd          # per node: $SLURMD_SPOOL/n1, .../n2
RUN_DIR=/run/slurm
CHECK_DIR=/var/tmp/slurm-ci-check       # output of the verification jobs
NODES=(n1 n2)
PORTS=(17001 17002)
CTLD_PORT=6817

log()  { printf '[slurm-up %3ss] %s\n' "$(( $(date +%s) - T0 ))" "$*"; }
die()  { log "ERROR: $*"; exit 1; }

dump_diagnostics() {
  set +e
  echo "================ slurm-up diagnostics ================"
  echo "--- processes"; ps -eo pid,user,etime,args 2>/dev/null | grep -E '[m]unged|[s]lurm' || true
  echo "--- scontrol ping";          timeout 10 scontrol ping 2>&1
  echo "--- sinfo -N -l";            timeout 10 sinfo -N -l 2>&1
  echo "--- sinfo -R";               timeout 10 sinfo -R 2>&1
  echo "--- squeue";                 timeout 10 squeue -a -l 2>&1
  echo "--- scontrol show jobs";     timeout 10 scontrol show jobs 2>&1 | tail -n 60
  for f in "$LOG_DIR/slurmctld.log" "$LOG_DIR"/slurmd-n*.log; do
    [ -f "$f" ] && { echo "--- tail -n 60 $f"; tail -n 60 "$f"; }
  done
  [ -f /var/log/munge/munged.log ] && { echo "--- tail -n 15 munged.log"; tail -n 15 /var/log/munge/munged.log; }
  echo "--- $CONF"; cat "$CONF" 2>/dev/null
  echo "======================================================"
}
on_exit() {
  local rc=$?
  if [ "$rc" -ne 0 ]; then dump_diagnostics; log "FAILED (exit $rc)"; fi
}
trap on_exit EXIT

# wait_for <seconds> <description> <command...>: poll every 0.5 s, bounded.
wait_for() {
  local secs=$1 what=$2; shift 2
  local deadline=$(( $(date +%s) + secs ))
  until "$@" >/dev/null 2>&1; do
    [ "$(date +%s)" -lt "$deadline" ] || { log "timed out after ${secs}s waiting for: $what"; return 1; }
    sleep 0.5
  done
}

[ "$(id -u)" -eq 0 ] || die "must run as root"

# ---------------------------------------------------------------- install ---
need_install=0
for b in munged munge unmunge slurmctld slurmd sbatch srun squeue sacct scontrol sinfo; do
  command -v "$b" >/dev/null 2>&1 || need_install=1
done
if [ "$need_install" = 1 ]; then
  [ "${SLURM_CI_SKIP_INSTALL:-0}" = 1 ] && die "slurm/munge binaries missing and SLURM_CI_SKIP_INSTALL=1"
  log "installing slurm-wlm + munge via apt"
  export DEBIAN_FRONTEND=noninteractive
  apt_log=$(mktemp)
  # --no-install-recommends: the recommended slurm-wlm-plugins would pull ~30
  # more packages (hdf5, rocm-smi, ipmi, influxdb, ...) that are not needed.
  if ! { apt-get -o Acquire::Retries=3 update -qq &&
         apt-get -o Acquire::Retries=3 install -y -qq --no-install-recommends \
           slurm-wlm munge procps; } >"$apt_log" 2>&1; then
    cat "$apt_log"; die "apt-get failed"
  fi
  rm -f "$apt_log"
else
  log "slurm + munge already installed ($(slurmctld -V))"
fi

HOST=$(hostname -s 2>/dev/null || uname -n)
HOST=${HOST%%.*}

# ------------------------------------------------------------ /etc/hosts ---
# n1/n2 must resolve (srun/sbatch rendezvous uses node names), and so must the
# controller's own short hostname.
for name in "${NODES[@]}" "$HOST"; do
  if ! getent hosts "$name" >/dev/null 2>&1; then
    log "adding '$name' to /etc/hosts"
    [ -z "$(tail -c1 /etc/hosts 2>/dev/null)" ] || echo >>/etc/hosts   # missing final newline
    echo "127.0.0.1 $name" >>/etc/hosts
  fi
done

# ------------------------------------------------------------------ munge ---
install -d -o munge -g munge -m 0755 /run/munge
install -d -o munge -g munge -m 0700 /var/log/munge /etc/munge
install -d -o munge -g munge -m 0711 /var/lib/munge
if [ ! -s /etc/munge/munge.key ]; then
  log "creating munge key"
  if command -v mungekey >/dev/null 2>&1; then
    mungekey --create --keyfile=/etc/munge/munge.key --force
  else
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  fi
fi
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key

munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }
if munge_ok; then
  log "munged already running"
else
  log "starting munged"
  # A stale socket/pid from a killed munged makes a plain start refuse;
  # --force lets munged take over a socket that nobody is listening on.
  runuser -u munge -- /usr/sbin/munged --force
  wait_for 20 "munged to answer" munge_ok || die "munged did not start"
fi

# ------------------------------------------------------------- slurm.conf ---
install -d -m 0755 "$CONF_DIR" "$LOG_DIR" "$RUN_DIR" "$CHECK_DIR"
install -d -m 0700 "$CTLD_STATE"
for n in "${NODES[@]}"; do install -d -m 0755 "$SLURMD_SPOOL/$n"; done

MEM_MB=$(awk '/^MemTotal:/ {print int($2/1024)}' /proc/meminfo)
NODE_MEM=$(( MEM_MB / 2 ))        # each virtual node claims half the RAM
[ "$NODE_MEM" -ge 256 ] || NODE_MEM=256

NEW_CONF=$(mktemp)
cat >"$NEW_CONF" <<EOF
# Generated by .ci/slurm-up.sh -- local two-node test cluster. Do not edit.
ClusterName=medlava-ci
SlurmctldHost=${HOST}(127.0.0.1)
SlurmctldPort=${CTLD_PORT}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# Requeued jobs are held for cred_expire(+1) seconds before they may start
# again (default 120 s).  Keep it short so self-requeue tests are quick.
AuthInfo=cred_expire=10

StateSaveLocation=${CTLD_STATE}
SlurmdSpoolDir=${SLURMD_SPOOL}/%n
SlurmctldPidFile=${RUN_DIR}/slurmctld.pid
SlurmdPidFile=${RUN_DIR}/slurmd-%n.pid
SlurmctldLogFile=${LOG_DIR}/slurmctld.log
SlurmdLogFile=${LOG_DIR}/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info

# No cgroups in CI containers/VMs.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=1,sched_min_interval=100000
SlurmdParameters=config_overrides

# No slurmdbd/MySQL: sacct does not work.  Completed jobs stay visible to
# squeue/scontrol for MinJobAge seconds (fallback path), and a one-line
# completion record per job is appended to the jobcomp file.
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
JobCompType=jobcomp/filetxt
JobCompLoc=${LOG_DIR}/jobcomp.log
MinJobAge=600

JobRequeue=1
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
MessageTimeout=10
InactiveLimit=0
KillWait=10
WaitTime=0
TmpFS=/tmp
MailProg=/bin/true

NodeName=n[1-2] NodeHostname=${HOST} NodeAddr=127.0.0.1 Port=[${PORTS[0]}-${PORTS[1]}] CPUs=${CPUS_PER_NODE} RealMemory=${NODE_MEM} State=UNKNOWN
PartitionName=debug Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP
EOF

conf_changed=1
if [ -f "$CONF" ] && cmp -s "$NEW_CONF" "$CONF"; then conf_changed=0; fi
if [ "$conf_changed" = 1 ]; then
  log "writing $CONF"
  install -m 0644 "$NEW_CONF" "$CONF"
fi
rm -f "$NEW_CONF"

# ---------------------------------------------------------- daemon control ---
# pid_alive <pidfile> <comm>: pidfile exists and names a live process <comm>.
pid_alive() {
  local pf=$1 comm=$2 pid
  [ -s "$pf" ] || return 1
  pid=$(cat "$pf" 2>/dev/null) || return 1
  [ -n "$pid" ] && [ -r "/proc/$pid/comm" ] && [ "$(cat "/proc/$pid/comm")" = "$comm" ]
}
ctld_alive()   { pid_alive "$RUN_DIR/slurmctld.pid" slurmctld; }
slurmd_alive() { pid_alive "$RUN_DIR/slurmd-$1.pid" slurmd; }

# stop_daemons: SIGTERM every daemon we have a live pidfile for, then wait
# (bounded) for all of them together; SIGKILL stragglers.  Running jobs'
# slurmstepd processes are left alone and re-attach to the new slurmd.
stop_daemons() {
  local pids=() pf comm pid i
  for pf in "$RUN_DIR"/slurmd-n*.pid "$RUN_DIR/slurmctld.pid"; do
    [ -e "$pf" ] || continue
    comm=slurmd; [ "$pf" = "$RUN_DIR/slurmctld.pid" ] && comm=slurmctld
    if pid_alive "$pf" "$comm"; then
      pid=$(cat "$pf"); log "stopping $comm (pid $pid)"
      kill -TERM "$pid" 2>/dev/null || true; pids+=("$pid")
    fi
    rm -f "$pf"
  done
  for i in $(seq 1 60); do                      # <= 15 s
    local alive=0
    for pid in "${pids[@]}"; do [ -d "/proc/$pid" ] && alive=1; done
    [ "$alive" = 0 ] && return 0
    sleep 0.25
  done
  for pid in "${pids[@]}"; do
    [ -d "/proc/$pid" ] && { log "SIGKILL $pid"; kill -KILL "$pid" 2>/dev/null || true; }
  done
  sleep 0.5
}

# port_open <port>: some socket is LISTENing on TCP <port> (read from /proc so
# that probing does not make the daemons log "Zero Bytes were transmitted").
port_open() {
  local hex; hex=$(printf '%04X' "$1")
  awk -v p=":$hex" 'NR > 1 && $4 == "0A" && substr($2, length($2) - 4) == p {f=1} END {exit !f}' \
    /proc/net/tcp /proc/net/tcp6 2>/dev/null
}

nodes_state() { sinfo -h -N -p debug -o '%N %t' 2>/dev/null | sort -u; }
nodes_idle()  {
  local s; s=$(nodes_state)
  [ "$(printf '%s\n' "$s" | grep -cE '^n[12] idle$')" -eq 2 ]
}
cluster_healthy() {
  ctld_alive || return 1
  local n; for n in "${NODES[@]}"; do slurmd_alive "$n" || return 1; done
  [[ "$(timeout 10 scontrol ping 2>/dev/null)" == *"is UP"* ]] || return 1
  # idle, or busy running jobs ('mix'/'alloc') -- just not down/drained/unknown
  local bad
  bad=$(nodes_state | awk '$2 !~ /^(idle|mix|alloc|comp)$/' | wc -l)
  [ "$bad" -eq 0 ] && [ "$(nodes_state | wc -l)" -eq 2 ]
}

restart=1
if [ "$conf_changed" = 0 ] && [ "${SLURM_CI_RESTART:-0}" != 1 ] && cluster_healthy; then
  log "slurmctld + slurmd n1/n2 already running with the current config; reusing them"
  restart=0
fi

if [ "$restart" = 1 ]; then
  stop_daemons
  for p in "$CTLD_PORT" "${PORTS[@]}"; do
    port_open "$p" && die "port $p is still in use by another process (an old slurm started by hand?)"
  done

  # A restart is a reset: "slurmctld -c" drops all saved job/node state.
  # Otherwise jobs that were RUNNING when a daemon died are recovered as
  # running and block their node for minutes until slurmctld notices they
  # are gone.  SLURM_CI_KEEP_STATE=1 keeps the old queue instead.
  if [ "${SLURM_CI_KEEP_STATE:-0}" = 1 ]; then
    log "starting slurmctld (keeping saved state)"; slurmctld
  else
    log "starting slurmctld (clean state)"; slurmctld -c
  fi
  wait_for 30 "slurmctld to answer ping" \
    sh -c 'timeout 5 scontrol ping 2>/dev/null | grep -q "is UP"' || die "slurmctld did not come up"

  for i in "${!NODES[@]}"; do
    log "starting slurmd -N ${NODES[$i]}"
    slurmd -N "${NODES[$i]}"
  done
  for i in "${!NODES[@]}"; do
    wait_for 30 "slurmd ${NODES[$i]} on port ${PORTS[$i]}" port_open "${PORTS[$i]}" \
      || die "slurmd ${NODES[$i]} did not start"
  done
  sleep 1   # let the fresh slurmds register before judging node states
fi

# Nodes left DOWN/DRAINED by an earlier run (e.g. killed daemons) -> resume.
# ReturnToService=2 normally handles DOWN; DRAIN needs an explicit resume.
for n in "${NODES[@]}"; do
  st=$(sinfo -h -N -n "$n" -o '%t' 2>/dev/null | head -n1)
  case "$st" in
    drain*|drng*|down*|fail*) log "node $n is '$st'; resuming"; scontrol update NodeName="$n" State=RESUME || true ;;
  esac
done
wait_for "$WAIT" "both nodes idle" nodes_idle || die "nodes not idle: $(nodes_state | tr '\n' ' ')"
log "sinfo: $(sinfo -h -N -p debug -o '%N=%t' | sort -u | tr '\n' ' ')"

if [ "${SLURM_CI_SKIP_VERIFY:-0}" = 1 ]; then
  log "cluster up (verification skipped) in $(( $(date +%s) - T0 ))s"
  exit 0
fi

# ----------------------------------------------------------------- verify ---
# job_done <id>: no task of the job is pending/running/completing any more.
job_done() { [ -z "$(squeue -h -j "$1" -t PD,R,CG,CF,RQ,RS,RH,S,SE,SO 2>/dev/null)" ]; }
job_state() { scontrol show job -o "$1" 2>/dev/null | grep -o 'JobState=[A-Z_]*' | cut -d= -f2 | sort -u | tr '\n' ' ' | sed 's/ $//'; }
wait_job() {
  local id=$1 what=$2 st
  wait_for "$WAIT" "$what (job $id)" job_done "$id" || return 1
  st=$(job_state "$id")
  [ "$st" = COMPLETED ] || { log "$what (job $id) ended in state '$st'"; return 1; }
}

rm -rf "${CHECK_DIR:?}"/*
cd "$CHECK_DIR"

log "verify: srun -N2 -n2 across both nodes"
out=$(timeout 60 srun -N2 -n2 -l sh -c 'echo $SLURMD_NODENAME' | sort) || die "srun -N2 -n2 failed"
[ "$(printf '%s\n' "$out" | awk '{print $2}' | tr '\n' ' ')" = "n1 n2 " ] || die "srun ran on unexpected nodes: $out"
timeout 60 srun -N2 -n2 hostname >/dev/null || die "srun -N2 -n2 hostname failed"

log "verify: sbatch --wrap"
id=$(sbatch --parsable -o "$CHECK_DIR/wrap.out" --wrap 'echo wrap-ok') || die "sbatch --wrap failed"
wait_job "$id" "sbatch --wrap" || die "sbatch --wrap job did not complete"
grep -qx wrap-ok "$CHECK_DIR/wrap.out" || die "sbatch --wrap output wrong: $(cat "$CHECK_DIR/wrap.out" 2>&1)"

log "verify: 2-node batch job + SLURM_JOB_NODELIST"
cat >"$CHECK_DIR/two_nodes.sh" <<'EOF'
#!/bin/bash
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --output=two_nodes.out
scontrol show hostnames "$SLURM_JOB_NODELIST" >two_nodes.hosts
srun -l sh -c 'echo $SLURMD_NODENAME' | sort >two_nodes.steps
EOF
id=$(sbatch --parsable "$CHECK_DIR/two_nodes.sh") || die "sbatch two_nodes.sh failed"
wait_job "$id" "2-node batch job" || die "2-node job did not complete"
[ "$(tr '\n' ' ' <"$CHECK_DIR/two_nodes.hosts")" = "n1 n2 " ] \
  || die "SLURM_JOB_NODELIST expanded to '$(cat "$CHECK_DIR/two_nodes.hosts")', want n1 n2"
[ "$(awk '{print $2}' "$CHECK_DIR/two_nodes.steps" | tr '\n' ' ')" = "n1 n2 " ] \
  || die "srun inside 2-node job ran on '$(cat "$CHECK_DIR/two_nodes.steps")'"

log "verify: self-requeue (scontrol requeue \$SLURM_JOB_ID)"
cat >"$CHECK_DIR/requeue.sh" <<'EOF'
#!/bin/bash
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=requeue.out
echo "run restart_count=${SLURM_RESTART_COUNT:-0}"
if [ "${SLURM_RESTART_COUNT:-0}" -eq 0 ]; then
  scontrol requeue "$SLURM_JOB_ID"
  sleep 60            # killed by the requeue
  exit 1
fi
echo "second run ok" >requeue.done
EOF
id=$(sbatch --parsable "$CHECK_DIR/requeue.sh") || die "sbatch requeue.sh failed"
wait_for "$WAIT" "requeued job to run again" test -s "$CHECK_DIR/requeue.done" || die "requeued job never ran again"
wait_job "$id" "self-requeue job" || die "self-requeue job did not complete"
restarts=$(scontrol show job -o "$id" | grep -o 'Restarts=[0-9]*' | cut -d= -f2)
[ "$restarts" = 1 ] || die "expected Restarts=1, got '$restarts'"

log "verify: job array with throttle (--array=0-3%2)"
id=$(sbatch --parsable --array=0-3%2 -o "$CHECK_DIR/array_%a.out" --wrap 'echo $SLURM_ARRAY_TASK_ID') \
  || die "sbatch --array failed"
wait_job "$id" "array job" || die "array job did not complete"
for t in 0 1 2 3; do
  grep -qx "$t" "$CHECK_DIR/array_$t.out" 2>/dev/null || die "array task $t output missing/wrong"
done

log "verify: --dependency=afterok"
a=$(sbatch --parsable -o "$CHECK_DIR/dep_a.out" --wrap 'sleep 1; echo a') || die "sbatch dep a failed"
b=$(sbatch --parsable -d "afterok:$a" -o "$CHECK_DIR/dep_b.out" --wrap 'echo b') || die "sbatch dep b failed"
wait_job "$b" "afterok dependent job" || die "dependent job did not complete"
grep -qx b "$CHECK_DIR/dep_b.out" || die "dependent job output missing"

log "cluster up and verified in $(( $(date +%s) - T0 ))s (logs: $LOG_DIR, conf: $CONF)"
