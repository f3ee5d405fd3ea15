#!/bin/sh
# Runs a build step's command trusting the CA bundle given to the build as the secret
# `ca_bundle` (container/build.sh --ca-bundle FILE), for networks that reach the package
# registries through a proxy with a CA of its own; without that secret, as it is.
set -eu
bundle=/run/secrets/ca_bundle
if [ -s "$bundle" ]; then
  export SSL_CERT_FILE="$bundle" CURL_CA_BUNDLE="$bundle" PIP_CERT="$bundle" \
    CARGO_HTTP_CAINFO="$bundle" REQUESTS_CA_BUNDLE="$bundle"
fi
exec "$@"
