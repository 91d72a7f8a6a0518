#!/bin/sh
# vmstream in-guest agent, the portable version for real Linux guests. The
# demo guest runs the C version (vmstream-agent.c) for speed; the protocol is
# the same: one command line in, one JSON line out, on the virtio-serial port
# org.vmstream.agent, which the host reaches through the VM's agent.sock.
#
#   vmstream-agent.sh             serve the port (run it as a service)
#   vmstream-agent.sh run-hooks   run /etc/vmstream/clone.d/* (the agent does
#                                 this after applying a clone's identity)
#
# Needs only sh, base64, ip, od, sed and date (busybox or coreutils).
LC_ALL=C; export LC_ALL  # a '.' in $EPOCHREALTIME and in date's output
# The clock is read without a fork where the shell can ($EPOCHREALTIME: busybox
# ash, bash 5): the host times its round trip around the reading, and under TCG
# a fork costs tens of ms. Debian's sh (dash) cannot: serve from bash there.
if [ -z "${EPOCHREALTIME:-}" ] && [ "$1" != run-hooks ] && [ -x /bin/bash ]; then exec /bin/bash "$0" "$@"; fi
STATE=/run/vmstream
HOOKS_DIR=${VMSTREAM_HOOKS_DIR:-/etc/vmstream/clone.d}
MEMCHECK_RESULT=/run/memcheck.json
SELF=$(command -v "$0" 2>/dev/null || echo "$0")

# GNU date sets and steps the clock to the nanosecond; busybox date (without the demo
# guest's vmclock) to the second only. Found once, at start, not on a clone's path
# (nor for the hooks, which do not set the clock).
GNU_DATE=""
[ "$1" = run-hooks ] || ! date --version 2>/dev/null | grep -q GNU || GNU_DATE=1
now() {
  if [ -n "${EPOCHREALTIME:-}" ]; then echo "$EPOCHREALTIME"
  elif command -v vmclock >/dev/null; then vmclock get
  elif [ -n "$GNU_DATE" ]; then date +%s.%N
  else date +%s; fi
}
set_clock() {
  if command -v vmclock >/dev/null; then vmclock set "$1"
  elif [ -n "$GNU_DATE" ]; then date -s "@$1" >/dev/null
  else date -s "@${1%%.*}" >/dev/null; fi
}
# step_clock [+-]S.N: step the clock by that much (the host measured the offset).
step_clock() {
  if command -v vmclock >/dev/null; then vmclock step "$1"
  elif [ -n "$GNU_DATE" ]; then date -s "$1 seconds" >/dev/null
  else  # busybox date: whole seconds, rounded
    t=$(date +%s); d=${1#[+-]}; s=${d%%.*}; f=${d#*.}000000000; [ "$d" = "$s" ] && f=000000000
    [ "$(printf %.1s "$f")" -ge 5 ] && s=$((s + 1))
    case "$1" in -*) t=$((t - s)) ;; *) t=$((t + s)) ;; esac
    date -s "@$t" >/dev/null
  fi
}
# The VM's NIC: eth0, or the first Ethernet interface where udev renamed it (ens2, enp0s2).
iface() {
  [ -e /sys/class/net/eth0 ] && { echo eth0; return; }
  for t in /sys/class/net/*/type; do
    d=${t%/type}; [ "${d##*/}" != lo ] && [ "$(cat "$t" 2>/dev/null)" = 1 ] && { echo "${d##*/}"; return; }
  done
  echo eth0
}
mac() { cat "/sys/class/net/$(iface)/address" 2>/dev/null; }

find_port() {
  if [ -e /dev/virtio-ports/org.vmstream.agent ]; then echo /dev/virtio-ports/org.vmstream.agent; return; fi
  for f in /sys/class/virtio-ports/*/name; do
    [ "$(cat "$f" 2>/dev/null)" = org.vmstream.agent ] && { d=${f%/name}; echo "/dev/${d##*/}"; return; }
  done
}

run_hooks() {
  . "$STATE/params.env"
  started=$(now)
  items=""
  for hook in "$HOOKS_DIR"/*; do
    [ -f "$hook" ] && [ -x "$hook" ] || continue
    output=$("$hook" 2>&1)
    rc=$?
    b64=$(printf '%s' "$output" | head -c 65536 | base64 | tr -d '\n')
    items="$items${items:+,}{\"hook\":\"$(basename "$hook")\",\"rc\":$rc,\"output_b64\":\"$b64\"}"
  done
  printf '{"state":"done","started":%s,"finished":%s,"hooks":[%s]}\n' "$started" "$(now)" "$items" > "$STATE/hooks.json.tmp"
  mv "$STATE/hooks.json.tmp" "$STATE/hooks.json"
}

reply() { printf '%s\n' "$1" >&3; }

# identity B64: one "key value" per line: time, seed, hostname, mac,
# param NAME B64VALUE, userdata B64, and "hooks deferred" (wait for start-hooks).
# Clock, hostname and MAC are applied before the answer; the hooks run
# afterwards, at the lowest priority.
# prepare B64: clock, hostname, address and MAC only (a pooled QEMU's run-through);
# no hook inputs are written and no hooks run.
apply_identity() {
  mkdir -p "$STATE"
  rm -f "$STATE/hooks.json" "$STATE/hooks.deferred"
  deferred=""
  echo "$1" | base64 -d > "$STATE/identity" 2>/dev/null || { reply '{"ok":false,"error":"identity payload is not base64"}'; return; }
  : > "$STATE/params.env.tmp"
  while read -r key val; do
    case "$key" in
      time) set_clock "$val" ;;
      # mixed into the kernel's pool; a shell cannot credit it or force a reseed (the
      # native agent does), so here the kernel's vmgenid driver or its next timed reseed
      # sets clones' generators apart
      seed) echo "$val" | base64 -d > /dev/urandom 2>/dev/null ;;
      hostname) hostname "$val"; echo "$val" > /etc/hostname
                echo "export VMSTREAM_HOSTNAME='$val'" >> "$STATE/params.env.tmp" ;;
      ip) ip addr flush dev "$(iface)" && ip addr add "$val" dev "$(iface)" ;;
      mac) [ "$(mac)" = "$val" ] || ip link set dev "$(iface)" address "$val"
           echo "export VMSTREAM_MAC='$val'" >> "$STATE/params.env.tmp" ;;
      param) # the value stays base64 until the hook's shell decodes it: never re-parsed
             printf 'export %s="$(echo %s | base64 -d)"\n' "${val%% *}" "${val#* }" >> "$STATE/params.env.tmp" ;;
      userdata) echo "$val" | base64 -d > "$STATE/user-data"
                echo "export VMSTREAM_USER_DATA=$STATE/user-data" >> "$STATE/params.env.tmp" ;;
      hooks) [ "$val" = deferred ] && deferred=1 && : > "$STATE/hooks.deferred" ;;
    esac
  done < "$STATE/identity"
  rm -f "$STATE/identity"  # it held the seed
  reply "{\"ok\":true,\"hostname\":\"$(hostname)\",\"mac\":\"$(mac)\",\"time\":$(now)}"
  if [ "$2" = prepare ]; then rm -f "$STATE/params.env.tmp" "$STATE/hooks.deferred"; return; fi
  mv "$STATE/params.env.tmp" "$STATE/params.env"
  [ -n "$deferred" ] || start_hooks
}

start_hooks() {
  rm -f "$STATE/hooks.deferred"
  lowest=""; command -v nice >/dev/null && lowest="nice -n 19"  # busybox may lack nice
  $lowest sh "$SELF" run-hooks </dev/null >/dev/null 2>&1 &
}

memcheck_field() { sed -n "s/.*\"$1\":\([0-9-]*\).*/\1/p" "$MEMCHECK_RESULT" 2>/dev/null; }

wait_memcheck() { # wait_memcheck CONDITION: poll up to 120 s
  i=0
  while [ $i -lt 600 ]; do
    if [ -f "$MEMCHECK_RESULT" ] && eval "$1"; then return 0; fi
    sleep 0.2; i=$((i + 1))
  done
  return 1
}

handle() {
  set -- $1
  case "$1" in
    ping) reply '{"ok":true}' ;;
    time) if [ -n "${EPOCHREALTIME:-}" ]; then reply "{\"ok\":true,\"time\":$EPOCHREALTIME}"
          else reply "{\"ok\":true,\"time\":$(now)}"; fi ;;
    status)
      read -r up _ < /proc/uptime
      reply "{\"ok\":true,\"hostname\":\"$(hostname)\",\"mac\":\"$(mac)\",\"time\":$(now),\"uptime\":$up}" ;;
    clock) set_clock "$2" && reply "{\"ok\":true,\"time\":$(now)}" ;;
    clock-step)
      if step_clock "$2"; then reply "{\"ok\":true,\"time\":$(now)}"
      else reply '{"ok":false,"error":"clock-step needs [+-]SECONDS, or the step failed"}'; fi ;;
    random) reply "{\"ok\":true,\"random\":\"$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')\"}" ;;
    identity) apply_identity "$2" ;;
    prepare) apply_identity "$2" prepare ;;
    start-hooks)
      if [ -f "$STATE/hooks.deferred" ]; then start_hooks; reply '{"ok":true,"started":true}'
      else reply '{"ok":true,"started":false}'; fi ;;
    hooks)
      if [ -f "$STATE/hooks.json" ]; then reply "{\"ok\":true,\"result\":$(cat "$STATE/hooks.json")}"
      elif [ -f "$STATE/hooks.deferred" ]; then reply '{"ok":true,"result":{"state":"pending"}}'
      elif [ -f "$STATE/params.env" ]; then reply '{"ok":true,"result":{"state":"running"}}'
      else reply '{"ok":true,"result":{"state":"none"}}'; fi ;;
    listening)  # a TCP socket listens on port $2 (the host's readiness check tcp:PORT)
      want=$(printf ':%04X' "${2:-0}")
      if cat /proc/net/tcp /proc/net/tcp6 2>/dev/null | awk -v p="$want" \
          '$4 == "0A" && toupper(substr($2, length($2) - 4)) == p { found = 1 } END { exit !found }'; then
        reply '{"ok":true,"listening":true}'
      else reply '{"ok":true,"listening":false}'; fi ;;
    memcheck-fill)
      if [ -f /run/memcheck.pid ]; then kill "$(cat /run/memcheck.pid)" 2>/dev/null; fi
      rm -f "$MEMCHECK_RESULT"
      memcheck daemon "${2:-16}" "${3:-1}" &
      echo $! > /run/memcheck.pid
      if wait_memcheck 'grep -q "\"state\":\"filled\"" "$MEMCHECK_RESULT"'; then
        reply "{\"ok\":true,\"result\":$(cat "$MEMCHECK_RESULT")}"
      else reply '{"ok":false,"error":"memcheck did not finish filling"}'; fi ;;
    memcheck-verify)
      if [ ! -f /run/memcheck.pid ] || ! kill -0 "$(cat /run/memcheck.pid)" 2>/dev/null; then
        reply '{"ok":false,"error":"no memcheck running: run memcheck-fill first"}'; return
      fi
      before=$(memcheck_field verifications)
      kill -USR1 "$(cat /run/memcheck.pid)"
      if wait_memcheck '[ "$(memcheck_field verifications)" -gt "$before" ]'; then
        reply "{\"ok\":true,\"result\":$(cat "$MEMCHECK_RESULT")}"
      else reply '{"ok":false,"error":"memcheck did not answer"}'; fi ;;
    memcheck-dirty) # rewrite a region at a given rate until stopped: a migration load
      if [ -f /run/memdirty.pid ]; then kill "$(cat /run/memdirty.pid)" 2>/dev/null; fi
      memcheck dirty "${2:-64}" "${3:-20}" </dev/null >/dev/null 2>&1 &
      echo $! > /run/memdirty.pid
      reply "{\"ok\":true,\"pid\":$!,\"mib\":${2:-64},\"rate_mb_s\":${3:-20}}" ;;
    memcheck-dirty-stop)
      stopped=false
      if [ -f /run/memdirty.pid ] && kill "$(cat /run/memdirty.pid)" 2>/dev/null; then stopped=true; fi
      rm -f /run/memdirty.pid
      reply "{\"ok\":true,\"stopped\":$stopped,\"result\":$(cat /run/memdirty.json 2>/dev/null || echo null)}" ;;
    "") ;;
    *) reply "{\"ok\":false,\"error\":\"unknown command: $1\"}" ;;
  esac
}

if [ "$1" = run-hooks ]; then run_hooks; exit 0; fi

# A clone's new MAC is announced at once (gratuitous ARP): otherwise slirp, or the
# hosts on a bridge, keep sending to the image's MAC, and a connection opened
# across the change waits for retransmissions (seconds).
echo 1 > /proc/sys/net/ipv4/conf/all/arp_notify 2>/dev/null

# The port stays open: the guest driver drops what the host sends while it is
# closed. A read returns at once (end of file) while no host is connected, so
# then wait a little and read again.
until port=$(find_port) && [ -n "$port" ] && exec 3<>"$port"; do sleep 1; done
while :; do
  if read -r line <&3; then handle "$line"; else sleep 0.3; fi
done
