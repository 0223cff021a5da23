#!/usr/bin/env bash
# Creates the CA of one cluster's routers and the certificate they present to each other, for
# links between routers (manifests/router-links/).
#
#   certs/router.sh --cluster NAME [--out DIR] [--namespace NS] [--days N] [--apply]
#
# Writes ca.crt, ca.key, tls.crt and tls.key to DIR (default ./servicekeel-router-certs). The
# certificate names servicekeel-router.NAME, the identity every router of the cluster shows and
# expects. Prints the Secret servicekeel-router-tls, or creates it with --apply. Rerunning
# replaces the certificate (and the CA only if DIR has none). Give ca.crt to other clusters as
# this cluster's trustBundle in their peers files.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

out=./servicekeel-router-certs
namespace=servicekeel-system
cluster=
days=365
apply=false

usage() { sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
while [ $# -gt 0 ]; do
  case "$1" in
    --cluster) cluster=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --namespace) namespace=$2; shift 2 ;;
    --days) days=$2; shift 2 ;;
    --apply) apply=true; shift ;;
    -h|--help) usage 0 ;;
    *) echo "router.sh: unknown argument: $1" >&2; usage 2 >&2 ;;
  esac
done
command -v openssl >/dev/null || { echo "router.sh: openssl is required" >&2; exit 1; }
[ -n "$cluster" ] || { echo "router.sh: --cluster is required (the router's --cluster)" >&2; exit 2; }
case "$cluster" in
  *[!a-z0-9.-]*|-*|*-|.*|*.) echo "router.sh: --cluster must be a DNS-1123 subdomain" >&2; exit 2 ;;
esac
case "$days" in ''|*[!0-9]*) echo "router.sh: --days must be a whole number" >&2; exit 2 ;; esac

mkdir -p "$out"
umask 077
make_ca "$out" "servicekeel-router-ca.$cluster" "$((days * 3))"
identity="servicekeel-router.$cluster"
# Routers are both servers and clients of each other.
issue "$out" "$identity" "DNS:$identity" serverAuth,clientAuth "$days"

secret=$(cat <<YAML
apiVersion: v1
kind: Secret
metadata:
  name: servicekeel-router-tls
  namespace: $namespace
type: Opaque
data:
  tls.crt: $(base64 -w0 < "$out/tls.crt")
  tls.key: $(base64 -w0 < "$out/tls.key")
  ca.crt: $(base64 -w0 < "$out/ca.crt")
YAML
)

if [ "$apply" = true ]; then
  command -v kubectl >/dev/null || { echo "router.sh: --apply needs kubectl" >&2; exit 1; }
  kubectl get namespace "$namespace" >/dev/null 2>&1 || kubectl create namespace "$namespace"
  printf '%s\n' "$secret" | kubectl apply -f -
else
  echo "# Secret for the routers (kubectl apply -f -):"
  printf '%s\n' "$secret"
fi
echo "certificates in $out (router identity $identity, valid $days days)" >&2
