//! Runs only the control plane, for tests and for running it on its own:
//! `oxlet-apiserver [--data-dir DIR] [--listen ADDR:PORT] [--kubeconfig PATH]`.

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("OXLET_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
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
    match control::up(cfg) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprint!("error: {e}");
            let mut cause = std::error::Error::source(&e);
            while let Some(c) = cause {
                eprint!(": {c}");
                cause = c.source();
            }
            eprintln!();
            std::process::ExitCode::FAILURE
        }
    }
}

fn usage(bad: &str) -> ! {
    eprintln!("bad argument {bad:?}; usage: oxlet-apiserver [--data-dir DIR] [--listen ADDR:PORT] [--kubeconfig PATH]");
    std::process::exit(2)
}
