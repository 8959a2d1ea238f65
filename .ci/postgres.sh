# Sourced by .ci/run: make a PostgreSQL server listen on 127.0.0.1 and export
# JOBFLOW_CACHE_TEST_POSTGRES_URI for the test suite. Needs root (apt-get, pg_ctlcluster).
if [ "$(id -u)" != 0 ]; then
    echo "postgres.sh: not root; the tests start a private server or skip" >&2
    return 0
fi
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    echo "postgres.sh: installing PostgreSQL from Debian" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q postgresql >/dev/null
fi
JFC_PG_VERSION=$(ls /usr/lib/postgresql | sort -n | tail -1)
if ! pg_lsclusters -h | awk '{print $1, $2}' | grep -qx "$JFC_PG_VERSION main"; then
    pg_createcluster "$JFC_PG_VERSION" main >/dev/null
fi
JFC_PG_STARTED=0
if ! pg_lsclusters -h | awk -v v="$JFC_PG_VERSION" '$1 == v && $2 == "main" {print $4}' | grep -q online; then
    pg_ctlcluster "$JFC_PG_VERSION" main start
    JFC_PG_STARTED=1
fi
trap 'if [ "$JFC_PG_STARTED" = 1 ]; then pg_ctlcluster "$JFC_PG_VERSION" main stop || true; fi' EXIT
JFC_PG_PORT=$(pg_lsclusters -h | awk -v v="$JFC_PG_VERSION" '$1 == v && $2 == "main" {print $3}')
(cd / && runuser -u postgres -- psql -q -p "$JFC_PG_PORT" -v ON_ERROR_STOP=1 -c "DO \$\$ BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'jfc') THEN
        CREATE ROLE jfc LOGIN SUPERUSER PASSWORD 'jfc';
    END IF; END \$\$;")
export JOBFLOW_CACHE_TEST_POSTGRES_URI="postgresql://jfc:jfc@127.0.0.1:${JFC_PG_PORT}/postgres"
echo "postgres.sh: PostgreSQL $JFC_PG_VERSION on 127.0.0.1:$JFC_PG_PORT" >&2
