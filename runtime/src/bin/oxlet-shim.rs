//! `oxlet-shim`: supervises one container for the runtime (see `runtime::shim`).

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    std::process::exit(runtime::shim::main(args));
}
