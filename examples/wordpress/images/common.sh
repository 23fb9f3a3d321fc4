# Shared by the image hooks (sourced; mmdebstrap runs each hook on the host with the chroot as $1).

# WordPress's site files from Debian's `wordpress` package, unpacked without its dependencies
# (apache2 | httpd among them): nginx serves the static files, php-fpm runs the scripts.
wordpress_files() {
  root=$1
  archives=$root/var/cache/apt/archives
  deb=$(ls "$archives"/wordpress_*.deb 2>/dev/null | sort -V | tail -n 1 || true)
  if [ -z "$deb" ]; then
    (cd "$archives" && APT_CONFIG=$MMDEBSTRAP_APT_CONFIG apt-get download -q \
      -o APT::Sandbox::User=root wordpress >/dev/null)
    deb=$(ls "$archives"/wordpress_*.deb | sort -V | tail -n 1)
  fi
  dpkg-deb -x "$deb" "$root"
  # The package's config switch reads /etc/wordpress/config-<host>.php; the example mounts its
  # own wp-config.php over it (ConfigMap wp-config).
  rm -rf "$root/etc/apparmor.d/apache2.d"
}

# What a container never reads: documentation, package lists, logs of the build, and perl's
# library (Debian's package scripts use it; nginx, php-fpm and mariadbd do not; perl-base stays).
prune() {
  root=$1
  rm -rf "$root"/usr/share/perl/* "$root"/usr/lib/x86_64-linux-gnu/perl/*
  rm -rf "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/* \
    "$root"/usr/share/locale/* "$root"/usr/share/lintian "$root"/usr/share/bash-completion \
    "$root"/var/lib/apt/lists/* "$root"/var/cache/debconf/*-old "$root"/var/log/*.log \
    "$root"/var/log/apt
}
