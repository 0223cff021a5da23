#!/usr/bin/env bash
# Creates a CA and a serving certificate for the ServiceKeel webhook, for a manual install.
#
#   certs/generate.sh [--out DIR] [--namespace NS] [--service NAME] [--days N] [--apply]
#
# Writes ca.crt, ca.key, tls.crt and tls.key to DIR (default ./servicekeel-certs), prints the
# Secret manifest and the caBundle, and with --apply creates the Secret and fills caBundle in the
# MutatingWebhookConfiguration with kubectl. Rerunning replaces the serving certificate (and the
# CA only if DIR has none), which the webhook picks up without a restart.
set -euo pipefail

out=./servicekeel-certs
namespace=servicekeel-system
service=servicekeel-webhook
days=365
apply=false
webhook_config=servicekeel-sidecar-injector

usage() { sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out=$2; shift 2 ;;
    --namespace) namespace=$2; shift 2 ;;
    --service) service=$2; shift 2 ;;
    --days) days=$2; shift 2 ;;
    --apply) apply=true; shift ;;
    -h|--help) usage 0 ;;
    *) echo "generate.sh: unknown argument: $1" >&2; usage 2 >&2 ;;
  esac
done
command -v openssl >/dev/null || { echo "generate.sh: openssl is required" >&2; exit 1; }
case "$days" in ''|*[!0-9]*) echo "generate.sh: --days must be a whole number" >&2; exit 2 ;; esac

mkdir -p "$out"
umask 077
if [ ! -s "$out/ca.key" ] || [ ! -s "$out/ca.crt" ]; then
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -keyout "$out/ca.key" -out "$out/ca.crt" -days "$((days * 3))" \
    -subj "/CN=servicekeel-webhook-ca" \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
fi

dns="$service.$namespace.svc"
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
  -keyout "$out/tls.key.new" -out "$out/tls.csr" -subj "/CN=$dns" 2>/dev/null
openssl x509 -req -in "$out/tls.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" -CAcreateserial \
  -out "$out/tls.crt.new" -days "$days" \
  -extfile <(printf 'subjectAltName=DNS:%s,DNS:%s.%s,DNS:%s,DNS:%s.cluster.local\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n' \
    "$service" "$service" "$namespace" "$dns" "$dns") 2>/dev/null
# PKCS#8 key, then both files replaced at once.
openssl pkcs8 -topk8 -nocrypt -in "$out/tls.key.new" -out "$out/tls.key.p8"
mv "$out/tls.key.p8" "$out/tls.key"
mv "$out/tls.crt.new" "$out/tls.crt"
rm -f "$out/tls.key.new" "$out/tls.csr"

ca_bundle=$(base64 -w0 < "$out/ca.crt")
secret=$(cat <<YAML
apiVersion: v1
kind: Secret
metadata:
  name: $service-tls
  namespace: $namespace
type: kubernetes.io/tls
data:
  tls.crt: $(base64 -w0 < "$out/tls.crt")
  tls.key: $(base64 -w0 < "$out/tls.key")
  ca.crt: $ca_bundle
YAML
)

if [ "$apply" = true ]; then
  command -v kubectl >/dev/null || { echo "generate.sh: --apply needs kubectl" >&2; exit 1; }
  kubectl get namespace "$namespace" >/dev/null 2>&1 || kubectl create namespace "$namespace"
  printf '%s\n' "$secret" | kubectl apply -f -
  kubectl patch mutatingwebhookconfiguration "$webhook_config" --type=json \
    -p "[{\"op\":\"add\",\"path\":\"/webhooks/0/clientConfig/caBundle\",\"value\":\"$ca_bundle\"}]"
else
  echo "# Secret for the webhook (kubectl apply -f -):"
  printf '%s\n' "$secret"
  echo "---"
  echo "# caBundle for the MutatingWebhookConfiguration $webhook_config:"
  echo "# $ca_bundle"
fi
echo "certificates in $out (serving certificate for $dns, valid $days days)" >&2
