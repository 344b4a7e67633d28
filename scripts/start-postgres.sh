#!/usr/bin/env bash
# Starts a local PostgreSQL for the store tests (Debian's `postgresql`
# package, no Docker) and prints the URL of a role that may create
# databases, for GUST_TEST_POSTGRES. A running cluster is reused. Needs
# root: it installs the package when missing and runs the cluster as the
# `postgres` user.
#
#   export GUST_TEST_POSTGRES="$(scripts/start-postgres.sh)"
set -euo pipefail

PASSWORD="${GUST_PG_PASSWORD:-gust-test}"

if ! command -v pg_ctlcluster >/dev/null || ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
fi
version="$(ls /usr/lib/postgresql | sort -V | tail -1)"
cluster() { pg_lsclusters -h | awk -v v="$version" '$1 == v && $2 == "main"'; }
if [ -z "$(cluster)" ]; then
    pg_createcluster "$version" main >&2
fi
if ! cluster | grep -q online; then
    pg_ctlcluster "$version" main start >&2
fi
port="$(cluster | awk '{print $3}')"
runuser -u postgres -- psql -q -p "$port" -c "ALTER ROLE postgres PASSWORD '$PASSWORD'" >&2
echo "postgres://postgres:$PASSWORD@127.0.0.1:$port/postgres"
