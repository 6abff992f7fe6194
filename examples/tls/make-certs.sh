#!/usr/bin/env bash
# Writes a throwaway certificate authority and certificates for a Petal
# federation into DIR (OpenSSL only; P-256 keys; valid for DAYS, default 30):
#   ca.crt                    give to every client: --root-certificates ca.crt
#   server.pem, server.key    petal server --ssl-certfile server.pem --ssl-keyfile server.key
#   client.pem, client.key    for mutual TLS (petal server --ssl-ca-certfile ca.crt):
#                             petal client --ssl-certfile client.pem --ssl-keyfile client.key
# The server certificate names localhost, 127.0.0.1 and every HOST given
# (IP addresses or DNS names by which clients reach the server).
# Usage: make-certs.sh DIR [HOST...]    (DAYS=365 make-certs.sh ... for longer)
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: $0 DIR [HOST...]" >&2; exit 2; }
dir=$1
shift
days=${DAYS:-30}
mkdir -p "$dir"
cd "$dir"

sans="DNS:localhost,IP:127.0.0.1"
for h in "$@"; do
  if [[ $h =~ ^[0-9.]+$ || $h == *:* ]]; then sans+=",IP:$h"; else sans+=",DNS:$h"; fi
done

key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }

key ca.key
openssl req -x509 -new -key ca.key -sha256 -days "$days" -subj "/CN=Petal federation CA" \
  -addext "basicConstraints=critical,CA:TRUE" \
  -addext "keyUsage=critical,keyCertSign,cRLSign" -out ca.crt

# sign NAME CN EXTENDED_KEY_USAGE [SANS]
sign() {
  key "$1.key"
  openssl req -new -key "$1.key" -subj "/CN=$2" -out "$1.csr"
  {
    echo "basicConstraints=critical,CA:FALSE"
    echo "keyUsage=critical,digitalSignature"
    echo "extendedKeyUsage=$3"
    [ -z "${4:-}" ] || echo "subjectAltName=$4"
  } >"$1.ext"
  openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -sha256 \
    -days "$days" -extfile "$1.ext" -out "$1.pem" 2>/dev/null
  rm -f "$1.csr" "$1.ext"
}
sign server "${1:-localhost}" serverAuth "$sans"
sign client "petal client" clientAuth
rm -f ca.srl
chmod 600 ./*.key
echo "wrote $PWD: ca.crt (clients' --root-certificates), server.pem/server.key, client.pem/client.key; keep ca.key private"
