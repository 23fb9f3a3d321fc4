//! `oxlet-bridge`: a CNI plugin for a node bridge, compatible with the reference `bridge` options.

use std::io::{Read, Write};

fn main() {
    let mut stdin = Vec::new();
    let command = std::env::var("CNI_COMMAND").unwrap_or_default();
    if command != "VERSION" || !atty_stdin() {
        let _ = std::io::stdin().read_to_end(&mut stdin);
    }
    let version = serde_json::from_slice::<serde_json::Value>(&stdin)
        .ok()
        .and_then(|v| v["cniVersion"].as_str().map(String::from))
        .filter(|v| cni::types::version_supported(v))
        .unwrap_or_else(|| cni::types::LATEST_VERSION.to_string());
    let out = cni::plugin::run(|k| std::env::var(k).ok(), &stdin);
    let mut stdout = std::io::stdout().lock();
    match out {
        Ok(Some(v)) => {
            let _ = writeln!(stdout, "{v}");
        }
        Ok(None) => {}
        Err(e) => {
            let _ = writeln!(stdout, "{}", e.to_json(&version));
            let _ = stdout.flush();
            std::process::exit(1);
        }
    }
}

fn atty_stdin() -> bool {
    // SAFETY: isatty only inspects the descriptor.
    unsafe { libc::isatty(0) == 1 }
}
