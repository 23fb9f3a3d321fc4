//! The `oxlet` command.

mod agent_cmd;
mod image_cmd;
mod kube_context;
mod node_dirs;
mod proxy_cmd;
mod run_cmd;
mod status_cmd;
mod uninstall_cmd;
mod up_cmd;
mod up_config;

use anyhow::Result;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "oxlet",
    version,
    about = "A Linux-native Kubernetes node stack"
)]
struct Cli {
    /// Where oxlet keeps images, containers and state.
    #[arg(
        long,
        global = true,
        default_value = "/var/lib/oxlet",
        env = "OXLET_DATA_DIR"
    )]
    data_dir: std::path::PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Manage images: pull, list, remove, import.
    #[command(subcommand)]
    Image(image_cmd::ImageCommand),
    /// Run the single-node cluster (control plane, node agent and kube-proxy) until SIGTERM or
    /// Ctrl-C.
    #[command(args_override_self = true)]
    Up(up_cmd::UpArgs),
    /// Run the node agent: register this node and run the pods bound to it.
    Agent(agent_cmd::AgentArgs),
    /// Run one container from an image (or an OCI bundle) and exit with its exit code.
    Run(run_cmd::RunArgs),
    /// Run the node's kube-proxy: Services and EndpointSlices into nftables (table ip oxlet-proxy)
    /// until SIGTERM or Ctrl-C; the rules stay in place after it stops.
    Proxy(proxy_cmd::ProxyArgs),
    /// Tell what of `oxlet up` runs and what is unhealthy (API server, controllers, node agent,
    /// proxy, cluster DNS, CNI network), with the reason; exits 1 when anything is unhealthy.
    Status(status_cmd::StatusArgs),
    /// Remove what `oxlet up` and `oxlet agent` made on this machine: pods (containers, network
    /// attachments, sandboxes, cgroups, logs), nftables tables, the bridge and default CNI
    /// configuration, the data and state directories and the admin kubeconfig.
    Uninstall(uninstall_cmd::UninstallArgs),
    /// Write a kubeconfig for the agent of another machine: a client certificate for node NAME
    /// (user system:node:NAME, group system:nodes) from this control plane's CA.
    NodeKubeconfig {
        /// The node's name, as it will register (a DNS subdomain).
        name: String,
        /// API server URL as the node reaches it, e.g. https://192.168.56.10:6443.
        #[arg(long)]
        server: String,
        /// Where to write the kubeconfig (mode 0600).
        #[arg(long, short)]
        output: std::path::PathBuf,
    },
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("OXLET_LOG")
                .unwrap_or_else(|_| "warn,libcgroups=error,libcontainer=error".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // A user error is its message and causes on one line; the backtrace (captured when
            // RUST_BACKTRACE is set) only when debug logging was asked for.
            if tracing::enabled!(tracing::Level::DEBUG) {
                eprintln!("error: {e:?}");
            } else {
                eprintln!("error: {e:#}");
            }
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    // `oxlet up --config FILE`: the file's settings become flags ahead of the command line's.
    let command = Cli::command();
    let argv = up_config::expand(std::env::args_os().collect(), &command)?;
    let cli = Cli::from_arg_matches(&command.get_matches_from(argv)).unwrap_or_else(|e| e.exit());
    match cli.command {
        Command::Image(cmd) => image_cmd::run(&cli.data_dir, cmd),
        Command::Up(args) => up_cmd::run(&cli.data_dir, args),
        Command::Agent(args) => agent_cmd::run(&cli.data_dir, args),
        Command::Status(args) => status_cmd::run(args),
        Command::Uninstall(args) => uninstall_cmd::run(&cli.data_dir, args),
        Command::NodeKubeconfig {
            name,
            server,
            output,
        } => {
            control::certs::Pki::new(&cli.data_dir)
                .write_node_kubeconfig(&name, &server, &output)?;
            eprintln!("wrote {} for node {name}", output.display());
            Ok(())
        }
        Command::Proxy(args) => proxy_cmd::run(args),
        Command::Run(args) => {
            let code = run_cmd::run(&cli.data_dir, args)?;
            std::process::exit(code)
        }
    }
}
