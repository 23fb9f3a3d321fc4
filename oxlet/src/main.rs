//! The `oxlet` command.

mod image_cmd;
mod proxy_cmd;
mod run_cmd;

use anyhow::Result;
use clap::{Parser, Subcommand};

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
    /// Run the embedded Kubernetes API server (HTTPS) until SIGTERM or Ctrl-C.
    Up {
        /// HTTPS port of the API server.
        #[arg(long, default_value_t = 6443)]
        port: u16,
        /// Where to write the admin kubeconfig.
        #[arg(long, default_value = "/etc/oxlet/admin.kubeconfig")]
        kubeconfig: std::path::PathBuf,
        /// Pod addresses: each node gets a range of it as spec.podCIDR.
        #[arg(long, default_value = "10.244.0.0/16", value_parser = parse_cidr)]
        cluster_cidr: (std::net::Ipv4Addr, u8),
        /// Prefix length of each node's pod range.
        #[arg(long, default_value_t = 24)]
        node_cidr_mask_size: u8,
        /// How long a node may go without renewing its Lease before it is Ready=Unknown
        /// (e.g. 50s, 2m).
        #[arg(long, default_value = "50s", value_parser = parse_duration)]
        node_monitor_grace_period: std::time::Duration,
    },
    /// Run one container from an image (or an OCI bundle) and exit with its exit code.
    Run(run_cmd::RunArgs),
    /// Run the node's kube-proxy: Services and EndpointSlices into nftables (table ip oxlet-proxy)
    /// until SIGTERM or Ctrl-C; the rules stay in place after it stops.
    Proxy(proxy_cmd::ProxyArgs),
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

fn parse_cidr(s: &str) -> Result<(std::net::Ipv4Addr, u8), String> {
    let (ip, len) = s
        .split_once('/')
        .ok_or_else(|| format!("{s:?} is not an IPv4 CIDR such as 10.244.0.0/16"))?;
    let ip = ip.parse().map_err(|e| format!("{ip:?}: {e}"))?;
    let len: u8 = len.parse().map_err(|e| format!("{len:?}: {e}"))?;
    if len > 32 {
        return Err(format!("prefix length {len} is more than 32"));
    }
    Ok((ip, len))
}

/// `50s`, `2m`, `1h` or plain seconds.
fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration such as 50s or 2m"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (s, m or h)")),
    };
    Ok(std::time::Duration::from_secs(secs))
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("OXLET_LOG")
                .unwrap_or_else(|_| "warn,libcgroups=error,libcontainer=error".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Image(cmd) => image_cmd::run(&cli.data_dir, cmd),
        Command::Up {
            port,
            kubeconfig,
            cluster_cidr,
            node_cidr_mask_size,
            node_monitor_grace_period,
        } => {
            let mut cfg = control::Config::new(&cli.data_dir);
            cfg.listen = std::net::SocketAddr::from(([0, 0, 0, 0], port));
            cfg.kubeconfig = kubeconfig;
            cfg.controller_cfg.cluster_cidr = cluster_cidr;
            cfg.controller_cfg.node_cidr_mask = node_cidr_mask_size;
            cfg.controller_cfg.node_monitor_grace_period = node_monitor_grace_period;
            Ok(control::up(cfg)?)
        }
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
