#!/bin/sh
# Customizes the MariaDB image: an entrypoint that initializes an empty data directory (the
# example's emptyDir), sets the root password from MYSQL_ROOT_PASSWORD for connections from
# other pods, creates MYSQL_DATABASE and runs the server in the foreground on all addresses.
set -eu
. "$(dirname "$0")/common.sh"
# The package's own database, made by its postinst, is replaced by the one the entrypoint makes.
rm -rf "$1"/var/lib/mysql/*
cat > "$1/usr/local/bin/mariadb-entrypoint" <<'SCRIPT'
#!/bin/sh
set -eu
data=/var/lib/mysql
: "${MYSQL_ROOT_PASSWORD:?MYSQL_ROOT_PASSWORD is not set}"
mkdir -p /run/mysqld
chown mysql:mysql /run/mysqld "$data"
if [ ! -d "$data/mysql" ]; then
  mariadb-install-db --user=mysql --datadir="$data" --skip-test-db >/dev/null
fi
# SQL string literal: backslashes and quotes doubled.
quote() { printf "'%s'" "$(printf '%s' "$1" | sed -e 's/\\/\\\\/g' -e "s/'/''/g")"; }
pw=$(quote "$MYSQL_ROOT_PASSWORD")
init=/run/mysqld/init.sql
umask 077
{
  echo "CREATE USER IF NOT EXISTS 'root'@'%' IDENTIFIED BY $pw;"
  echo "ALTER USER 'root'@'%' IDENTIFIED BY $pw;"
  echo "GRANT ALL ON *.* TO 'root'@'%' WITH GRANT OPTION;"
  if [ -n "${MYSQL_DATABASE:-}" ]; then
    echo "CREATE DATABASE IF NOT EXISTS \`$(printf '%s' "$MYSQL_DATABASE" | tr -d '\`')\`;"
  fi
} > "$init"
chown mysql:mysql "$init"
exec mariadbd --user=mysql --datadir="$data" --bind-address=0.0.0.0 --skip-name-resolve \
  --init-file="$init" "$@"
SCRIPT
chmod 755 "$1/usr/local/bin/mariadb-entrypoint"
prune "$1"
