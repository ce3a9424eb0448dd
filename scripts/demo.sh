#!/usr/bin/env bash
# The demo: Pebble (Let's Encrypt's test CA, with pebble-challtestsrv as its
# DNS) as the CA, the acme-agent, and Envoy with the filter, configured from
# envoy-config/standalone/ with only ports and paths changed. The agent orders
# certificates for www.example.com + example.com and api.example.com; Envoy
# answers the CA's challenges itself and then serves the certificates, which
# it gets from the agent's SDS server on one listener, by SNI; the demo checks
# them against Pebble's root. Runs until Ctrl-C.
#
#   scripts/demo.sh            # set up, run, check, keep running
#   scripts/demo.sh --check    # stop after the check (exit 0 when it passed)
#
# Ports (loopback): HTTP 18080, HTTPS 18443, agent probes and metrics 19182,
# Envoy admin 19901, app 18000, Pebble 14000 (management 15000), DNS 18053
# (management 18055). The agent's API and SDS are Unix sockets in
# .run/demo/sockets, as in the shipped config.
# Override with the DEMO_*_PORT variables below if one is taken.
set -euo pipefail
cd "$(dirname "$0")/.."

t0=$(date +%s.%N)
check_only=false
case "${1:-}" in
  --check) check_only=true ;;
  "") ;;
  *) echo "usage: scripts/demo.sh [--check]" >&2; exit 64 ;;
esac

HTTP_PORT=${DEMO_HTTP_PORT:-18080}
HTTPS_PORT=${DEMO_HTTPS_PORT:-18443}
HEALTH_PORT=${DEMO_HEALTH_PORT:-19182}
ADMIN_PORT=${DEMO_ADMIN_PORT:-19901}
APP_PORT=${DEMO_APP_PORT:-18000}
PEBBLE_PORT=${DEMO_PEBBLE_PORT:-14000}
PEBBLE_MGMT_PORT=${DEMO_PEBBLE_MGMT_PORT:-15000}
DNS_PORT=${DEMO_DNS_PORT:-18053}
DNS_MGMT_PORT=${DEMO_DNS_MGMT_PORT:-18055}

# Bold only on a terminal: no escape codes in a captured log.
if [ -t 2 ]; then b=$'\033[1m' n=$'\033[0m'; else b="" n=""; fi
if [ -t 1 ]; then ob=$'\033[1m' on=$'\033[0m'; else ob="" on=""; fi
say() { printf '%s[demo]%s %s\n' "$b" "$n" "$*" >&2; }
die() { say "FAILED: $*"; exit 1; }

scripts/setup.sh demo
say "building the filter and the agent"
wasm="$PWD/$(scripts/build-filter.sh 2>/dev/null)"
agent="$PWD/$(scripts/build-agent.sh)"

for port in $HTTP_PORT $HTTPS_PORT $HEALTH_PORT $ADMIN_PORT $APP_PORT $PEBBLE_PORT $PEBBLE_MGMT_PORT $DNS_PORT $DNS_MGMT_PORT; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    die "port $port is in use (set the matching DEMO_*_PORT)"
  fi
done

run="$PWD/.run/demo"
rm -rf "$run"
mkdir -p "$run/www"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT
trap 'say "stopping"; exit 0' INT TERM
started=$(date +%s.%N)

# Pebble's own TLS certificate: a small CA and a leaf for 127.0.0.1.
ec=(-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes)
openssl req -x509 "${ec[@]}" -days 2 -subj "/CN=demo CA for Pebble" \
  -keyout "$run/ca.key" -out "$run/ca.pem" 2>/dev/null
openssl req "${ec[@]}" -subj "/CN=localhost" -keyout "$run/pebble.key" -out "$run/pebble.csr" 2>/dev/null
printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=critical,CA:FALSE\nextendedKeyUsage=serverAuth\n' > "$run/leaf.ext"
openssl x509 -req -days 2 -CAcreateserial -in "$run/pebble.csr" -CA "$run/ca.pem" -CAkey "$run/ca.key" \
  -extfile "$run/leaf.ext" -out "$run/pebble.pem" 2>/dev/null
cat > "$run/pebble.json" <<EOF
{"pebble": {
  "listenAddress": "127.0.0.1:$PEBBLE_PORT",
  "managementListenAddress": "127.0.0.1:$PEBBLE_MGMT_PORT",
  "certificate": "$run/pebble.pem",
  "privateKey": "$run/pebble.key",
  "httpPort": $HTTP_PORT,
  "tlsPort": 5001,
  "ocspResponderURL": "",
  "externalAccountBindingRequired": false
}}
EOF

say "starting pebble-challtestsrv (DNS: every name is 127.0.0.1) and Pebble"
pebble-challtestsrv -defaultIPv6 "" -defaultIPv4 127.0.0.1 -dns01 "127.0.0.1:$DNS_PORT" \
  -http01 "" -https01 "" -tlsalpn01 "" -management "127.0.0.1:$DNS_MGMT_PORT" \
  > "$run/challtestsrv.log" 2>&1 &
pids+=($!)
PEBBLE_VA_NOSLEEP=1 pebble -config "$run/pebble.json" -dnsserver "127.0.0.1:$DNS_PORT" > "$run/pebble.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do
  curl -sf --cacert "$run/ca.pem" "https://127.0.0.1:$PEBBLE_PORT/dir" >/dev/null && break
  sleep 0.1
done
curl -sf --cacert "$run/ca.pem" "https://127.0.0.1:$PEBBLE_PORT/dir" >/dev/null || die "Pebble did not start (see $run/pebble.log)"

# The app behind Envoy.
echo "Hello from the app behind Envoy" > "$run/www/index.html"
python3 -m http.server "$APP_PORT" --bind 127.0.0.1 --directory "$run/www" > "$run/app.log" 2>&1 &
pids+=($!)

# The agent's config: envoy-config/standalone/agent.toml with the demo's paths,
# ports and CA. For Let's Encrypt staging, keep directory = "letsencrypt-staging"
# and drop ca_root; that is the whole change.
sed -e "s|^state_dir = .*|state_dir = \"$run/state\"|" \
    -e "s|^directory = .*|directory = \"https://127.0.0.1:$PEBBLE_PORT/dir\"\nca_root = \"$run/ca.pem\"|" \
    -e "s|/run/acme-agent/|$run/sockets/|" \
    -e "s|127.0.0.1:9182|127.0.0.1:$HEALTH_PORT|" \
    -e "s|^target = .*|target = \"127.0.0.1:$HTTP_PORT\"|" \
    -e "s|^tls_target = .*|tls_target = \"127.0.0.1:$HTTPS_PORT\"|" \
    envoy-config/standalone/agent.toml > "$run/agent.toml"
"$agent" --config "$run/agent.toml" check-config >/dev/null

# Envoy's config: envoy-config/standalone/envoy.yaml with the demo's ports and paths.
sed -e "s|/etc/envoy/acme_filter.wasm|$wasm|" \
    -e "s|port_value: 80 }|port_value: $HTTP_PORT }|" \
    -e "s|port_value: 443 }|port_value: $HTTPS_PORT }|" \
    -e "s|/run/acme-agent/|$run/sockets/|" \
    -e "s|port_value: 9901 }|port_value: $ADMIN_PORT }|" \
    -e "s|port_value: 8000 }|port_value: $APP_PORT }|" \
    -e "s|0.0.0.0|127.0.0.1|g" \
    -e "s|https_redirect: true|https_redirect: true, port_redirect: $HTTPS_PORT|" \
    envoy-config/standalone/envoy.yaml > "$run/envoy.yaml"

say "starting the agent"
"$agent" --config "$run/agent.toml" run > "$run/agent.log" 2>&1 &
pids+=($!)

say "starting Envoy with the filter (--concurrency 2)"
.venv/bin/envoy -c "$run/envoy.yaml" --concurrency 2 --disable-hot-restart \
  --log-level warning --component-log-level wasm:info > "$run/envoy.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do
  curl -sf "http://127.0.0.1:$ADMIN_PORT/ready" >/dev/null 2>&1 && break
  sleep 0.1
done
curl -sf "http://127.0.0.1:$ADMIN_PORT/ready" >/dev/null || die "Envoy did not start (see $run/envoy.log)"

curl -sf --cacert "$run/ca.pem" "https://127.0.0.1:$PEBBLE_MGMT_PORT/roots/0" > "$run/pebble-root.pem"
domains=(www.example.com example.com api.example.com)
say "waiting for Envoy to serve certificates that verify against Pebble's root"
first=""
for domain in "${domains[@]}"; do
  ok=false
  for _ in $(seq 600); do
    if curl -sf --max-time 2 --resolve "$domain:$HTTPS_PORT:127.0.0.1" --cacert "$run/pebble-root.pem" \
        "https://$domain:$HTTPS_PORT/" > "$run/answer.txt" 2>/dev/null; then
      ok=true
      break
    fi
    sleep 0.1
  done
  $ok || die "no verified TLS answer for $domain (see $run/agent.log, $run/envoy.log)"
  [ -n "$first" ] || first=$(date +%s.%N)
done

echo
for domain in "${domains[@]}"; do
  printf '%shttps://%s:%s/%s -> %s\n' "$ob" "$domain" "$HTTPS_PORT" "$on" \
    "$(curl -s --resolve "$domain:$HTTPS_PORT:127.0.0.1" --cacert "$run/pebble-root.pem" "https://$domain:$HTTPS_PORT/")"
  openssl s_client -connect "127.0.0.1:$HTTPS_PORT" -servername "$domain" </dev/null 2>/dev/null \
    | openssl x509 -noout -subject -ext subjectAltName -issuer -enddate 2>/dev/null \
    | sed -e 's/^/    /' -e '/^ *$/d'
  openssl s_client -connect "127.0.0.1:$HTTPS_PORT" -servername "$domain" -CAfile "$run/pebble-root.pem" \
    -verify_return_error </dev/null 2>/dev/null | grep -q "Verify return code: 0 (ok)" \
    && echo "    chain verifies against Pebble's root: yes"
done
echo
printf 'plain HTTP is redirected: %s\n' \
  "$(curl -s -o /dev/null -w '%{http_code} -> %{redirect_url}' --resolve "www.example.com:$HTTP_PORT:127.0.0.1" "http://www.example.com:$HTTP_PORT/")"
served=$(curl -s "http://127.0.0.1:$ADMIN_PORT/stats?filter=acme_filter.challenges_served" | awk '{print $2}')
printf 'challenges answered by the filter inside Envoy: %s\n' "$served"
elapsed() { python3 -c "print(f'{$2 - $1:.2f}')"; }
printf 'first verified TLS answer: %s s after the command, %s s after the CA started\n' \
  "$(elapsed "$t0" "$first")" "$(elapsed "$started" "$first")"
echo
status_cmd="${agent#"$PWD/"} --config ${run#"$PWD/"}/agent.toml status"
echo "\$ $status_cmd"
"$agent" --config "$run/agent.toml" status
echo
say "inspect the agent again with: $status_cmd"
say "logs: $run/{agent,envoy,pebble,challtestsrv,app}.log; configs: $run/{agent.toml,envoy.yaml}"

if $check_only; then
  say "check passed"
  exit 0
fi
say "running; try: curl --cacert $run/pebble-root.pem --resolve www.example.com:$HTTPS_PORT:127.0.0.1 https://www.example.com:$HTTPS_PORT/"
say "press Ctrl-C to stop"
wait
