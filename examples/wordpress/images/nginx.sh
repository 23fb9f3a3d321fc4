#!/bin/sh
# Customizes the nginx image: Debian's nginx with WordPress's files, logging to the container's
# output; the server block comes from the ConfigMap in examples/wordpress/nginx.yaml.
set -eu
. "$(dirname "$0")/common.sh"
wordpress_files "$1"
rm -f "$1/etc/nginx/sites-enabled/default"
ln -sf /dev/stdout "$1/var/log/nginx/access.log"
ln -sf /dev/stderr "$1/var/log/nginx/error.log"
prune "$1"
