//! The `oxlet-bridge` plugin: verbs dispatched from the CNI environment and stdin.

mod add;
mod check;
mod del;
mod gc;

use crate::config::{BridgeConf, Command, Env, HostLocalConf};
use crate::exec::{self, Invocation};
use crate::ipam::{self, IpamError, Range};
use crate::link::LinkError;
use crate::masq::MasqError;
use crate::types::{self, code, CniError, CniResult};
use serde_json::{json, Value};
use std::path::PathBuf;

impl From<IpamError> for CniError {
    fn from(e: IpamError) -> Self {
        match e {
            IpamError::Config(m) => CniError::new(code::INVALID_CONFIG, m),
            IpamError::Io { .. } => CniError::new(code::IO_FAILURE, e.to_string()),
            IpamError::Exhausted(_) => CniError::internal(e),
        }
    }
}

impl From<LinkError> for CniError {
    fn from(e: LinkError) -> Self {
        CniError::internal(e)
    }
}

impl From<MasqError> for CniError {
    fn from(e: MasqError) -> Self {
        match e {
            MasqError::Failed { stderr, script } => {
                CniError::internal(format!("nft failed: {stderr}")).with_details(script)
            }
            MasqError::Spawn(e) => CniError::new(code::IO_FAILURE, format!("cannot run nft: {e}")),
        }
    }
}

/// Runs one verb. `get` reads the environment. Returns the JSON to print, if any.
pub fn run(get: impl Fn(&str) -> Option<String>, stdin: &[u8]) -> Result<Option<Value>, CniError> {
    let cmd_name = get("CNI_COMMAND").unwrap_or_default();
    let command = Command::parse(&cmd_name).ok_or_else(|| {
        if cmd_name.is_empty() {
            CniError::new(
                code::INVALID_ENV,
                "required environment variable CNI_COMMAND is missing",
            )
        } else {
            CniError::new(
                code::INVALID_ENV,
                format!(
                    "CNI_COMMAND {cmd_name:?} is not one of ADD, DEL, CHECK, VERSION, STATUS, GC"
                ),
            )
        }
    })?;
    if command == Command::Version {
        let requested = serde_json::from_slice::<Value>(stdin)
            .ok()
            .and_then(|v| v["cniVersion"].as_str().map(String::from));
        let v = requested
            .filter(|v| types::version_supported(v))
            .unwrap_or_else(|| types::LATEST_VERSION.to_string());
        return Ok(Some(
            json!({"cniVersion": v, "supportedVersions": types::SUPPORTED_VERSIONS}),
        ));
    }
    let env = Env::from_vars(command, &get)?;
    let conf = BridgeConf::parse(stdin)?;
    if matches!(command, Command::Status | Command::Gc)
        && !types::version_at_least(&conf.cni_version, "1.1.0")
    {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!(
                "{cmd_name} needs cniVersion 1.1.0 or later, the configuration says {}",
                conf.cni_version
            ),
        ));
    }
    let ctx = Ctx {
        ipam: Ipam::from_conf(&conf)?,
        port_mappings: if command == Command::Add || command == Command::Check {
            crate::hostport::parse(conf.runtime_config.as_ref())?
        } else {
            Vec::new()
        },
        conf,
        env,
        stdin: stdin.to_vec(),
        raw_args: get("CNI_ARGS").unwrap_or_default(),
    };
    let version = ctx.conf.cni_version.clone();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .map_err(|e| CniError::internal(format!("tokio runtime: {e}")))?;
    match command {
        Command::Add => rt
            .block_on(add::add(&ctx))
            .map(|r| Some(r.to_json(&version))),
        Command::Del => rt.block_on(del::del(&ctx)).map(|()| None),
        Command::Check => rt.block_on(check::check(&ctx)).map(|()| None),
        Command::Status => gc::status(&ctx).map(|()| None),
        Command::Gc => rt.block_on(gc::gc(&ctx)).map(|()| None),
        Command::Version => unreachable!(),
    }
}

/// The IPAM a configuration asks for.
pub(crate) enum Ipam {
    None,
    HostLocal {
        conf: Box<HostLocalConf>,
        sets: Vec<Vec<Range>>,
        dir: PathBuf,
    },
    Delegate {
        kind: String,
    },
}

impl Ipam {
    fn from_conf(conf: &BridgeConf) -> Result<Self, CniError> {
        let Some(ipam) = &conf.ipam else {
            return Ok(Ipam::None);
        };
        match conf.ipam_type() {
            Some("host-local") => {
                let c = HostLocalConf::parse(ipam)?;
                let sets = ipam::range_sets(&c)?;
                Ok(Ipam::HostLocal {
                    dir: ipam::data_dir(&c),
                    conf: Box::new(c),
                    sets,
                })
            }
            Some(kind) if !kind.is_empty() => Ok(Ipam::Delegate {
                kind: kind.to_string(),
            }),
            _ => Err(CniError::new(
                code::INVALID_CONFIG,
                "the \"ipam\" section has no \"type\"",
            )),
        }
    }
}

/// Everything one invocation knows.
pub(crate) struct Ctx {
    pub conf: BridgeConf,
    pub env: Env,
    pub ipam: Ipam,
    /// `runtimeConfig.portMappings` (ADD and CHECK).
    pub port_mappings: Vec<crate::hostport::PortMapping>,
    pub stdin: Vec<u8>,
    pub raw_args: String,
}

impl Ctx {
    /// Opens CNI_NETNS; a path that cannot be opened is the caller's error (code 4).
    pub fn open_netns(&self) -> Result<std::fs::File, CniError> {
        crate::ns::open(&self.env.netns).map_err(|e| {
            CniError::new(
                code::INVALID_ENV,
                format!("cannot open CNI_NETNS {:?}", self.env.netns),
            )
            .with_details(e)
        })
    }

    /// The host end's name: stable per attachment, so DEL and GC find it without the netns.
    pub fn host_veth(&self) -> String {
        host_veth_name(&self.env.container_id, &self.env.ifname)
    }

    /// The prefix of the attachment's hostPort chains.
    pub fn hostport_prefix(&self) -> String {
        crate::hostport::chain_prefix(&self.env.container_id, &self.env.ifname)
    }

    /// Runs the delegated IPAM plugin with this invocation's environment and stdin.
    pub fn delegate(&self, command: &str) -> Result<Option<Value>, CniError> {
        let Ipam::Delegate { kind } = &self.ipam else {
            return Ok(None);
        };
        let paths: Vec<PathBuf> = self.env.path.iter().map(PathBuf::from).collect();
        let plugin = exec::find_plugin(kind, &paths)?;
        let path = self.env.path.join(":");
        let inv = Invocation {
            command,
            container_id: &self.env.container_id,
            netns: &self.env.netns,
            ifname: &self.env.ifname,
            args: &self.raw_args,
            path: &path,
        };
        exec::invoke(&plugin, &inv, &self.stdin)
    }

    /// The subnets this network masquerades from (host-local ranges, or the given addresses).
    pub fn subnets(&self, fallback: &[crate::ipam::IpNet]) -> Vec<crate::ipam::IpNet> {
        match &self.ipam {
            Ipam::HostLocal { sets, .. } => sets.iter().flatten().map(|r| r.subnet).collect(),
            _ => fallback.iter().map(|n| n.network()).collect(),
        }
    }

    pub fn prev_result(&self) -> Result<Option<CniResult>, CniError> {
        self.conf
            .prev_result
            .as_ref()
            .map(|v| {
                CniResult::from_value(v).map_err(|e| {
                    CniError::new(code::DECODE_FAILURE, "cannot decode prevResult").with_details(e)
                })
            })
            .transpose()
    }
}

/// `vox` + 12 hex digits of FNV-1a over `containerID/ifname` (15 bytes: a full interface name).
pub fn host_veth_name(container_id: &str, ifname: &str) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in container_id.bytes().chain([b'/']).chain(ifname.bytes()) {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    format!("vox{:012x}", h & 0xffff_ffff_ffff)
}

/// Whether a link name is one of ours.
pub fn is_host_veth_name(name: &str) -> bool {
    name.len() == 15 && name.starts_with("vox") && name[3..].bytes().all(|b| b.is_ascii_hexdigit())
}

/// Random locally administered unicast MAC.
pub(crate) fn random_mac() -> [u8; 6] {
    let mut b = [0u8; 6];
    // SAFETY: getrandom writes at most b.len() bytes into the buffer.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != 6 {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos() as u64
            ^ std::process::id() as u64;
        b.copy_from_slice(&t.to_le_bytes()[..6]);
    }
    b[0] = (b[0] & 0xfe) | 0x02;
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn veth_names() {
        let a = host_veth_name("c1", "eth0");
        assert_eq!(a.len(), 15);
        assert!(is_host_veth_name(&a));
        assert_eq!(a, host_veth_name("c1", "eth0"));
        assert_ne!(a, host_veth_name("c1", "eth1"));
        assert!(!is_host_veth_name("veth1234"));
    }

    #[test]
    fn mac_is_local_unicast() {
        let m = random_mac();
        assert_eq!(m[0] & 0x03, 0x02);
    }
}
