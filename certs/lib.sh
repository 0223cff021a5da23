# Shared by generate.sh and router.sh: a CA kept across runs, and certificates it issues.
# Sourced, not run.

# make_ca DIR CN DAYS: DIR/ca.crt and DIR/ca.key, made only if DIR has none.
make_ca() {
  local out=$1 cn=$2 days=$3
  if [ ! -s "$out/ca.key" ] || [ ! -s "$out/ca.crt" ]; then
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
      -keyout "$out/ca.key" -out "$out/ca.crt" -days "$days" \
      -subj "/CN=$cn" \
      -addext "basicConstraints=critical,CA:TRUE" \
      -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
  fi
}

# issue DIR CN SANS EKU DAYS: DIR/tls.crt and DIR/tls.key (PKCS#8) signed by DIR's CA, for the
# subject alternative names SANS (e.g. "DNS:a,DNS:b") and extended key usage EKU; both files are
# replaced at once.
issue() {
  local out=$1 cn=$2 sans=$3 eku=$4 days=$5
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -keyout "$out/tls.key.new" -out "$out/tls.csr" -subj "/CN=$cn" 2>/dev/null
  openssl x509 -req -in "$out/tls.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" -CAcreateserial \
    -out "$out/tls.crt.new" -days "$days" \
    -extfile <(printf 'subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=%s\n' \
      "$sans" "$eku") 2>/dev/null
  openssl pkcs8 -topk8 -nocrypt -in "$out/tls.key.new" -out "$out/tls.key.p8"
  mv "$out/tls.key.p8" "$out/tls.key"
  mv "$out/tls.crt.new" "$out/tls.crt"
  rm -f "$out/tls.key.new" "$out/tls.csr"
}
