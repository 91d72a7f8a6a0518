#!/bin/sh
# vmstream in-guest agent, portable version for real Linux guests (the demo
# guest runs the C version, vmstream-agent.c, with the same protocol): one
# JSON line answered per command line on the vmstream virtio console, which
# the host reaches through the VM's agent.sock. Needs: sh, base64, ip, od.
PORT=${VMSTREAM_AGENT_PORT:-/dev/hvc0}
RESULT=/run/memcheck.json
STATE=/run/vmstream

reply() { printf '%s\n' "$1" >&3; }

json_field() { # json_field FILE KEY -> numeric value of KEY in a flat JSON file
  sed -n "s/.*\"$2\":\([0-9-]*\).*/\1/p" "$1" 2>/dev/null
}

wait_for() { # wait_for KEY VALUE-PREDICATE-CMD: poll RESULT up to 120 s
  i=0
  while [ $i -lt 600 ]; do
    if [ -f "$RESULT" ] && eval "$1"; then return 0; fi
    sleep 0.2; i=$((i + 1))
  done
  return 1
}

# identity B64: the host's new identity for this clone, one "key value" per
# line: time, hostname, mac, param NAME B64VALUE, userdata B64. The clock,
# hostname and MAC are applied before the answer; hooks run afterwards.
apply_identity() {
  mkdir -p "$STATE"
  rm -f "$STATE/hooks.json"
  echo "$1" | base64 -d > "$STATE/identity" || { reply '{"ok":false,"error":"identity payload is not base64"}'; return; }
  : > "$STATE/params.env.tmp"
  while read -r key val; do
    case "$key" in
      time) vmclock set "$val" ;;
      hostname) hostname "$val"; echo "$val" > /etc/hostname
                echo "export VMSTREAM_HOSTNAME='$val'" >> "$STATE/params.env.tmp" ;;
      mac) ip link set dev eth0 address "$val"
           echo "export VMSTREAM_MAC='$val'" >> "$STATE/params.env.tmp" ;;
      param) # the value stays base64 until the hook's shell decodes it: never re-parsed
             printf 'export %s="$(echo %s | base64 -d)"\n' "${val%% *}" "${val#* }" >> "$STATE/params.env.tmp" ;;
      userdata) echo "$val" | base64 -d > "$STATE/user-data"
                echo "export VMSTREAM_USER_DATA=$STATE/user-data" >> "$STATE/params.env.tmp" ;;
    esac
  done < "$STATE/identity"
  mv "$STATE/params.env.tmp" "$STATE/params.env"
  reply "{\"ok\":true,\"hostname\":\"$(hostname)\",\"mac\":\"$(cat /sys/class/net/eth0/address)\",\"time\":$(vmclock get)}"
  nice -n 19 /bin/vmstream-hooks </dev/null >/dev/null 2>&1 &
}

handle() {
  set -- $1
  case "$1" in
    ping) reply '{"ok":true}' ;;
    status)
      read -r up _ < /proc/uptime
      reply "{\"ok\":true,\"hostname\":\"$(hostname)\",\"mac\":\"$(cat /sys/class/net/eth0/address)\",\"time\":$(vmclock get),\"uptime\":$up,\"status\":$(wget -qO- http://127.0.0.1/)}" ;;
    time) reply "{\"ok\":true,\"time\":$(vmclock get)}" ;;
    clock) vmclock set "$2" && reply "{\"ok\":true,\"time\":$(vmclock get)}" ;;
    random) reply "{\"ok\":true,\"random\":\"$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')\"}" ;;
    identity) apply_identity "$2" ;;
    hooks)
      if [ -f "$STATE/hooks.json" ]; then reply "{\"ok\":true,\"result\":$(cat "$STATE/hooks.json")}"
      elif [ -f "$STATE/params.env" ]; then reply '{"ok":true,"result":{"state":"running"}}'
      else reply '{"ok":true,"result":{"state":"none"}}'; fi ;;
    memcheck-fill)
      mib=${2:-16}; seed=${3:-1}
      if [ -f /run/memcheck.pid ]; then kill "$(cat /run/memcheck.pid)" 2>/dev/null; fi
      rm -f "$RESULT"
      /bin/memcheck daemon "$mib" "$seed" &
      echo $! > /run/memcheck.pid
      if wait_for 'grep -q "\"state\":\"filled\"" "$RESULT"'; then
        reply "{\"ok\":true,\"result\":$(cat "$RESULT")}"
      else
        reply '{"ok":false,"error":"memcheck did not finish filling"}'
      fi ;;
    memcheck-verify)
      if [ ! -f /run/memcheck.pid ] || ! kill -0 "$(cat /run/memcheck.pid)" 2>/dev/null; then
        reply '{"ok":false,"error":"no memcheck running: run memcheck-fill first"}'
        return
      fi
      before=$(json_field "$RESULT" verifications)
      kill -USR1 "$(cat /run/memcheck.pid)"
      if wait_for '[ "$(json_field "$RESULT" verifications)" -gt "$before" ]'; then
        reply "{\"ok\":true,\"result\":$(cat "$RESULT")}"
      else
        reply '{"ok":false,"error":"memcheck did not answer"}'
      fi ;;
    "") ;;
    *) reply "{\"ok\":false,\"error\":\"unknown command: $1\"}" ;;
  esac
}

while :; do
  if [ -c "$PORT" ] && exec 3<>"$PORT"; then
    stty -F "$PORT" raw -echo 2>/dev/null
    while read -r line <&3; do handle "$line"; done
    exec 3>&-
  fi
  sleep 1
done
