//! The plugin's inputs: `CNI_*` environment and the network configuration on stdin.

use crate::types::{self, code, Attachment, CniError, Route};
use serde::Deserialize;
use serde_json::Value;
use std::collections::HashMap;
use std::net::IpAddr;

/// The verbs of the specification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
    Status,
    Gc,
}

impl Command {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "ADD" => Self::Add,
            "DEL" => Self::Del,
            "CHECK" => Self::Check,
            "VERSION" => Self::Version,
            "STATUS" => Self::Status,
            "GC" => Self::Gc,
            _ => return None,
        })
    }
}

/// The `CNI_*` variables of one invocation.
#[derive(Debug, Clone, Default)]
pub struct Env {
    pub container_id: String,
    pub netns: String,
    pub ifname: String,
    pub path: Vec<String>,
    pub args: Vec<(String, String)>,
}

impl Env {
    /// Reads and validates the variables `command` needs.
    pub fn from_vars(
        command: Command,
        get: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, CniError> {
        let need = |name: &str, required: bool| -> Result<String, CniError> {
            match get(name).filter(|v| !v.is_empty()) {
                Some(v) => Ok(v),
                None if required => Err(CniError::new(
                    code::INVALID_ENV,
                    format!("required environment variable {name} is missing"),
                )),
                None => Ok(String::new()),
            }
        };
        let (cid, netns, ifname) = match command {
            Command::Add | Command::Check => (true, true, true),
            Command::Del => (true, false, true),
            _ => (false, false, false),
        };
        let env = Env {
            container_id: need("CNI_CONTAINERID", cid)?,
            netns: need("CNI_NETNS", netns)?,
            ifname: need("CNI_IFNAME", ifname)?,
            path: need("CNI_PATH", false)?
                .split(':')
                .filter(|p| !p.is_empty())
                .map(String::from)
                .collect(),
            args: parse_args(&get("CNI_ARGS").unwrap_or_default())?,
        };
        if !env.ifname.is_empty() && !valid_ifname(&env.ifname) {
            return Err(CniError::new(
                code::INVALID_ENV,
                format!("CNI_IFNAME {:?} is not a valid interface name", env.ifname),
            ));
        }
        if !env.container_id.is_empty()
            && !env
                .container_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
        {
            return Err(CniError::new(
                code::INVALID_ENV,
                format!(
                    "CNI_CONTAINERID {:?} has characters other than [a-zA-Z0-9_.-]",
                    env.container_id
                ),
            ));
        }
        Ok(env)
    }
}

/// Linux interface names: 1-15 bytes, no `/`, whitespace or `:`, not `.` or `..`.
pub fn valid_ifname(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 15
        && n != "."
        && n != ".."
        && !n.chars().any(|c| c == '/' || c == ':' || c.is_whitespace())
}

fn parse_args(s: &str) -> Result<Vec<(String, String)>, CniError> {
    s.split(';')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
            _ => Err(CniError::new(
                code::INVALID_ENV,
                format!("CNI_ARGS entry {p:?} is not KEY=VALUE"),
            )),
        })
        .collect()
}

/// The `oxlet-bridge` network configuration (reference `bridge` option names).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BridgeConf {
    pub cni_version: String,
    pub name: String,
    #[serde(rename = "type", default)]
    pub kind: String,
    #[serde(default)]
    pub bridge: Option<String>,
    #[serde(default)]
    pub is_gateway: bool,
    #[serde(default)]
    pub is_default_gateway: bool,
    #[serde(default)]
    pub force_address: bool,
    #[serde(default)]
    pub ip_masq: bool,
    #[serde(default)]
    pub hairpin_mode: bool,
    #[serde(default)]
    pub promisc_mode: bool,
    #[serde(default)]
    pub mtu: Option<u32>,
    #[serde(default)]
    pub ipam: Option<Value>,
    #[serde(default)]
    pub prev_result: Option<Value>,
    #[serde(default)]
    pub runtime_config: Option<Value>,
    #[serde(rename = "cni.dev/valid-attachments", default)]
    pub valid_attachments: Option<Vec<Attachment>>,
}

impl BridgeConf {
    /// Parses stdin; decode errors give code 6, semantic ones code 7 or 1.
    pub fn parse(stdin: &[u8]) -> Result<Self, CniError> {
        let mut conf: BridgeConf = serde_json::from_slice(stdin).map_err(|e| {
            CniError::new(
                code::DECODE_FAILURE,
                "failed to decode the network configuration",
            )
            .with_details(e)
        })?;
        if !types::version_supported(&conf.cni_version) {
            return Err(CniError::new(
                code::INCOMPATIBLE_VERSION,
                format!(
                    "cniVersion {:?} is not supported (supported: {})",
                    conf.cni_version,
                    types::SUPPORTED_VERSIONS.join(", ")
                ),
            ));
        }
        if conf.name.is_empty() {
            return Err(CniError::new(
                code::INVALID_CONFIG,
                "the network configuration has no name",
            ));
        }
        if conf.is_default_gateway {
            conf.is_gateway = true;
        }
        let br = conf.bridge.get_or_insert_with(|| "cni0".to_string());
        if !valid_ifname(br) {
            return Err(CniError::new(
                code::INVALID_CONFIG,
                format!("bridge name {br:?} is not a valid interface name"),
            ));
        }
        if let Some(m) = conf.mtu {
            if !(68..=65535).contains(&m) {
                return Err(CniError::new(
                    code::INVALID_CONFIG,
                    format!("mtu {m} is out of range 68-65535"),
                ));
            }
        }
        Ok(conf)
    }

    pub fn bridge_name(&self) -> &str {
        self.bridge.as_deref().unwrap_or("cni0")
    }

    /// The IPAM `type`, if an `ipam` section exists.
    pub fn ipam_type(&self) -> Option<&str> {
        self.ipam.as_ref()?.get("type")?.as_str()
    }
}

/// One range of a host-local range set.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RangeConf {
    pub subnet: String,
    #[serde(default)]
    pub range_start: Option<IpAddr>,
    #[serde(default)]
    pub range_end: Option<IpAddr>,
    #[serde(default)]
    pub gateway: Option<IpAddr>,
}

/// The reference `host-local` IPAM options this crate serves in-process.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct HostLocalConf {
    #[serde(default)]
    pub ranges: Vec<Vec<RangeConf>>,
    #[serde(default)]
    pub subnet: Option<String>,
    #[serde(default)]
    pub range_start: Option<IpAddr>,
    #[serde(default)]
    pub range_end: Option<IpAddr>,
    #[serde(default)]
    pub gateway: Option<IpAddr>,
    #[serde(default)]
    pub routes: Vec<Route>,
    #[serde(default)]
    pub data_dir: Option<String>,
    #[serde(default)]
    pub dns: Option<types::Dns>,
    /// Other keys are accepted and ignored, as the reference does.
    #[serde(flatten)]
    pub other: HashMap<String, Value>,
}

impl HostLocalConf {
    pub fn parse(ipam: &Value) -> Result<Self, CniError> {
        let mut c: HostLocalConf = serde_json::from_value(ipam.clone()).map_err(|e| {
            CniError::new(
                code::INVALID_CONFIG,
                "invalid host-local IPAM configuration",
            )
            .with_details(e)
        })?;
        if let Some(subnet) = c.subnet.take() {
            c.ranges.insert(
                0,
                vec![RangeConf {
                    subnet,
                    range_start: c.range_start,
                    range_end: c.range_end,
                    gateway: c.gateway,
                }],
            );
        }
        if c.ranges.is_empty() || c.ranges.iter().any(|s| s.is_empty()) {
            return Err(CniError::new(
                code::INVALID_CONFIG,
                "host-local IPAM needs at least one range in \"ranges\"",
            ));
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn env_validation() {
        let e = Env::from_vars(
            Command::Add,
            env(&[("CNI_CONTAINERID", "c1"), ("CNI_IFNAME", "eth0")]),
        )
        .unwrap_err();
        assert_eq!(e.code, code::INVALID_ENV);
        assert!(e.msg.contains("CNI_NETNS"));
        let ok = Env::from_vars(
            Command::Del,
            env(&[
                ("CNI_CONTAINERID", "c1"),
                ("CNI_IFNAME", "eth0"),
                ("CNI_ARGS", "A=1;B=2"),
            ]),
        )
        .unwrap();
        assert_eq!(ok.args.len(), 2);
        let bad = Env::from_vars(
            Command::Del,
            env(&[("CNI_CONTAINERID", "c1"), ("CNI_IFNAME", "a/b")]),
        )
        .unwrap_err();
        assert_eq!(bad.code, code::INVALID_ENV);
    }

    #[test]
    fn bridge_conf() {
        let c = BridgeConf::parse(
            br#"{"cniVersion":"1.0.0","name":"n","type":"oxlet-bridge","isDefaultGateway":true}"#,
        )
        .unwrap();
        assert!(c.is_gateway);
        assert_eq!(c.bridge_name(), "cni0");
        assert_eq!(
            BridgeConf::parse(b"{").unwrap_err().code,
            code::DECODE_FAILURE
        );
        assert_eq!(
            BridgeConf::parse(br#"{"cniVersion":"9.0.0","name":"n"}"#)
                .unwrap_err()
                .code,
            code::INCOMPATIBLE_VERSION
        );
        assert_eq!(
            BridgeConf::parse(br#"{"cniVersion":"1.0.0","name":""}"#)
                .unwrap_err()
                .code,
            code::INVALID_CONFIG
        );
    }

    #[test]
    fn host_local_legacy_subnet() {
        let c =
            HostLocalConf::parse(&serde_json::json!({"type":"host-local","subnet":"10.1.0.0/24"}))
                .unwrap();
        assert_eq!(c.ranges[0][0].subnet, "10.1.0.0/24");
        assert!(HostLocalConf::parse(&serde_json::json!({"type":"host-local"})).is_err());
    }
}
