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
. "$(dirname "$0")/lib.sh"

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
make_ca "$out" servicekeel-webhook-ca "$((days * 3))"
dns="$service.$namespace.svc"
issue "$out" "$dns" "DNS:$service,DNS:$service.$namespace,DNS:$dns,DNS:$dns.cluster.local" \
  serverAuth "$days"

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
