#!/bin/sh
# Customizes the php-fpm image: PHP 8.2's FastCGI server on port 9000 with mysqli and gd, the
# environment passed to scripts (wp-config.php reads the database password from it), logs on
# stderr, and WordPress's files.
set -eu
. "$(dirname "$0")/common.sh"
wordpress_files "$1"
fpm=$1/etc/php/8.2/fpm
sed -i -e 's#^listen = .*#listen = 9000#' \
  -e 's#^;clear_env = no#clear_env = no#' \
  -e 's#^;catch_workers_output = yes#catch_workers_output = yes#' \
  -e 's#^;decorate_workers_output = no#decorate_workers_output = no#' "$fpm/pool.d/www.conf"
# /run is empty in the image; the pid file goes where the process can write it.
sed -i -e 's#^pid = .*#pid = /tmp/php-fpm.pid#' \
  -e 's#^error_log = .*#error_log = /proc/self/fd/2#' "$fpm/php-fpm.conf"
prune "$1"
