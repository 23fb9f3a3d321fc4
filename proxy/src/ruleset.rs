//! The desired nftables state of one `ip` table as typed data, and the operations that bring the
//! kernel there: a full replace (one atomic transaction) or the difference from a previous state.
//! The operations render to `nft -f -` text and encode to nf_tables netlink (`crate::netlink`).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::{self, Write};
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use crate::model::Protocol;

/// Hook of a base chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    Prerouting,
    Input,
    Forward,
    Output,
    Postrouting,
}

impl Hook {
    fn as_str(self) -> &'static str {
        match self {
            Hook::Prerouting => "prerouting",
            Hook::Input => "input",
            Hook::Forward => "forward",
            Hook::Output => "output",
            Hook::Postrouting => "postrouting",
        }
    }
}

/// Type of a base chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChainType {
    Filter,
    Nat,
}

impl ChainType {
    pub fn as_str(self) -> &'static str {
        match self {
            ChainType::Filter => "filter",
            ChainType::Nat => "nat",
        }
    }
}

/// What makes a chain a base chain: the kernel calls it from `hook` at `priority`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseChain {
    pub kind: ChainType,
    pub hook: Hook,
    /// nft priority: a number or `dstnat`/`srcnat`.
    pub priority: &'static str,
}

impl BaseChain {
    /// The priority as the kernel takes it.
    pub fn priority_value(&self) -> i32 {
        match self.priority {
            "dstnat" => -100,
            "srcnat" => 100,
            "filter" => 0,
            p => p
                .parse()
                .expect("layout priorities are numbers or known names"),
        }
    }
}

/// Which address of the IPv4 header a match reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Addr {
    Saddr,
    Daddr,
}

impl Addr {
    fn as_str(self) -> &'static str {
        match self {
            Addr::Saddr => "saddr",
            Addr::Daddr => "daddr",
        }
    }
}

/// One condition of a rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Match {
    /// `ct state new`
    CtStateNew,
    /// `ip saddr|daddr [!=] NET` (a /32 prints as the address).
    Addr {
        field: Addr,
        negate: bool,
        net: Ipv4Net,
    },
    /// `ip saddr|daddr @set`
    AddrIn { field: Addr, set: String },
    /// `meta l4proto tcp`
    L4Proto(Protocol),
    /// `tcp dport 80`
    Dport(Protocol, u16),
    /// `numgen random mod N == 0`
    NumgenZero(u32),
    /// `fib saddr type local`
    FibSaddrLocal,
    /// `meta mark & MASK == 0`
    MarkClear(u32),
    /// `ct status dnat`
    CtStatusDnat,
    /// `ip saddr . ip daddr @set`
    AddrPairIn(String),
}

/// Concatenated keys a verdict map is looked up with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum KeyType {
    /// `ipv4_addr`
    Addr,
    /// `ipv4_addr . inet_proto . inet_service`
    AddrProtoPort,
    /// `inet_proto . inet_service`
    ProtoPort,
    /// `ipv4_addr . ipv4_addr`
    AddrAddr,
}

impl KeyType {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyType::Addr => "ipv4_addr",
            KeyType::AddrProtoPort => "ipv4_addr . inet_proto . inet_service",
            KeyType::ProtoPort => "inet_proto . inet_service",
            KeyType::AddrAddr => "ipv4_addr . ipv4_addr",
        }
    }
}

/// What a rule does once its conditions hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Verdict(Verdict),
    /// `ip daddr . meta l4proto . th dport vmap @map` (AddrProtoPort) or
    /// `meta l4proto . th dport vmap @map` (ProtoPort).
    Vmap(KeyType, String),
    /// `meta mark set meta mark | BITS`
    MarkOr(u32),
    /// `meta mark set meta mark ^ BITS`
    MarkXor(u32),
    /// `masquerade fully-random`
    MasqueradeFullyRandom,
    /// `reject with tcp reset`
    RejectTcpReset,
    /// `reject` (ICMP port unreachable)
    Reject,
    /// `update @set { ip saddr }`
    UpdateSaddr(String),
    /// `dnat to IP:PORT`
    Dnat(Ipv4Addr, u16),
    /// `dnat ip to numgen random mod 65536 map @map`: the endpoint whose range holds a random
    /// number (an `EndpointMap`).
    DnatRandom(String),
}

/// A verdict: of a rule or the value of a verdict map element.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Verdict {
    Jump(String),
    Goto(String),
    Return,
    Drop,
}

impl Verdict {
    /// The chain this verdict leads to, if any.
    pub fn chain(&self) -> Option<&str> {
        match self {
            Verdict::Jump(c) | Verdict::Goto(c) => Some(c),
            _ => None,
        }
    }
}

/// One rule: all of `matches`, then `action`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub matches: Vec<Match>,
    pub action: Action,
}

impl Rule {
    pub fn new(matches: Vec<Match>, action: Action) -> Rule {
        Rule { matches, action }
    }

    pub fn verdict(matches: Vec<Match>, v: Verdict) -> Rule {
        Rule::new(matches, Action::Verdict(v))
    }
}

/// A key of a set or verdict map element.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Key {
    Addr(Ipv4Addr),
    AddrProtoPort(Ipv4Addr, Protocol, u16),
    ProtoPort(Protocol, u16),
    AddrAddr(Ipv4Addr, Ipv4Addr),
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Chain {
    pub base: Option<BaseChain>,
    pub rules: Vec<Rule>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Set {
    pub key: KeyType,
    /// A set that rules add to (`flags dynamic,timeout`), its element timeout in seconds.
    pub timeout: Option<u32>,
    pub elements: BTreeSet<Key>,
}

impl Set {
    pub fn new(key: KeyType) -> Set {
        Set {
            key,
            timeout: None,
            elements: BTreeSet::new(),
        }
    }
}

/// A verdict map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Map {
    pub key: KeyType,
    pub elements: BTreeMap<Key, Verdict>,
}

impl Map {
    pub fn new(key: KeyType) -> Map {
        Map {
            key,
            elements: BTreeMap::new(),
        }
    }
}

/// The span of random numbers (`numgen random mod ENDPOINT_RANGE`) an endpoint map divides.
pub const ENDPOINT_RANGE: u32 = 65536;

/// A data map from a random number to an endpoint (`typeof numgen random mod 65536 : ip daddr .
/// tcp dport ; flags interval`): each target owns an equal range. Endpoints change by
/// replacing its elements, which the kernel applies without re-validating the table's chain
/// graph, as it must for any rule or verdict element.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointMap {
    pub protocol: Protocol,
    pub targets: Vec<(Ipv4Addr, u16)>,
}

impl EndpointMap {
    /// Each target's range `[first, last]`: equal shares of `ENDPOINT_RANGE` (within one).
    pub fn ranges(&self) -> impl Iterator<Item = (u32, u32, Ipv4Addr, u16)> + '_ {
        let n = self.targets.len() as u64;
        let span = u64::from(ENDPOINT_RANGE);
        self.targets.iter().enumerate().map(move |(k, (ip, port))| {
            let k = k as u64;
            let first = (k * span / n) as u32;
            let last = ((k + 1) * span / n - 1) as u32;
            (first, last, *ip, *port)
        })
    }
}

/// One step of a transaction on table `ip <table>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op<'a> {
    AddTable,
    DeleteTable,
    AddChain(&'a str, &'a Chain),
    FlushChain(&'a str),
    DeleteChain(&'a str),
    AddRule(&'a str, &'a Rule),
    AddSet(&'a str, &'a Set),
    AddMap(&'a str, &'a Map),
    DeleteSet(&'a str),
    DeleteMap(&'a str),
    AddElement(&'a str, &'a Key, Option<&'a Verdict>),
    DeleteElement(&'a str, &'a Key),
    AddEndpointMap(&'a str, &'a EndpointMap),
    /// Removes every element of a set or map.
    FlushElements(&'a str),
    /// One target of an endpoint map with its range.
    AddRange(&'a str, u32, u32, Ipv4Addr, u16),
}

impl Op<'_> {
    /// The nft command for this step.
    pub fn render(&self, table: &str) -> String {
        let t = table;
        match self {
            Op::AddTable => format!("add table ip {t}"),
            Op::DeleteTable => format!("delete table ip {t}"),
            Op::AddChain(name, c) => match &c.base {
                Some(b) => format!("add chain ip {t} {name} {{ {} }}", base_spec(b)),
                None => format!("add chain ip {t} {name}"),
            },
            Op::FlushChain(name) => format!("flush chain ip {t} {name}"),
            Op::DeleteChain(name) => format!("delete chain ip {t} {name}"),
            Op::AddRule(name, r) => format!("add rule ip {t} {name} {r}"),
            Op::AddSet(name, s) => format!("add set ip {t} {name} {{ {} }}", set_spec(s)),
            Op::AddMap(name, m) => format!(
                "add map ip {t} {name} {{ type {} : verdict ; }}",
                m.key.as_str()
            ),
            Op::DeleteSet(name) => format!("delete set ip {t} {name}"),
            Op::DeleteMap(name) => format!("delete map ip {t} {name}"),
            Op::AddElement(name, k, None) => format!("add element ip {t} {name} {{ {k} }}"),
            Op::AddElement(name, k, Some(v)) => {
                format!("add element ip {t} {name} {{ {k} : {v} }}")
            }
            Op::DeleteElement(name, k) => format!("delete element ip {t} {name} {{ {k} }}"),
            Op::AddEndpointMap(name, m) => {
                format!("add map ip {t} {name} {{ {} }}", endpoint_map_spec(m))
            }
            Op::FlushElements(name) => format!("flush map ip {t} {name}"),
            Op::AddRange(name, first, last, ip, port) => {
                format!("add element ip {t} {name} {{ {first}-{last} : {ip} . {port} }}")
            }
        }
    }
}

/// The whole desired content of table `ip <table>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ruleset {
    pub table: String,
    pub chains: BTreeMap<String, Chain>,
    pub sets: BTreeMap<String, Set>,
    pub maps: BTreeMap<String, Map>,
    pub endpoint_maps: BTreeMap<String, EndpointMap>,
}

impl Ruleset {
    pub fn new(table: impl Into<String>) -> Ruleset {
        Ruleset {
            table: table.into(),
            chains: BTreeMap::new(),
            sets: BTreeMap::new(),
            maps: BTreeMap::new(),
            endpoint_maps: BTreeMap::new(),
        }
    }

    /// Adds `other`'s chains and sets, and its elements to the sets and maps of the same name.
    pub fn merge(&mut self, other: Ruleset) {
        self.chains.extend(other.chains);
        for (name, s) in other.sets {
            match self.sets.get_mut(&name) {
                Some(mine) => mine.elements.extend(s.elements),
                None => {
                    self.sets.insert(name, s);
                }
            }
        }
        for (name, m) in other.maps {
            match self.maps.get_mut(&name) {
                Some(mine) => mine.elements.extend(m.elements),
                None => {
                    self.maps.insert(name, m);
                }
            }
        }
        self.endpoint_maps.extend(other.endpoint_maps);
    }

    /// The steps of one transaction that replaces whatever table of this name exists (or none)
    /// by this one, in dependency order.
    pub fn full_ops(&self) -> Vec<Op<'_>> {
        // `add` first so that `delete` cannot fail on a missing table.
        let mut ops = vec![Op::AddTable, Op::DeleteTable, Op::AddTable];
        ops.extend(self.chains.iter().map(|(n, c)| Op::AddChain(n, c)));
        ops.extend(self.sets.iter().map(|(n, s)| Op::AddSet(n, s)));
        // In `render_full`'s order, so that both list alike.
        ops.extend(
            self.endpoint_maps
                .iter()
                .map(|(n, m)| Op::AddEndpointMap(n, m)),
        );
        ops.extend(self.maps.iter().map(|(n, m)| Op::AddMap(n, m)));
        for (name, c) in &self.chains {
            ops.extend(c.rules.iter().map(|r| Op::AddRule(name, r)));
        }
        for (name, s) in &self.sets {
            ops.extend(s.elements.iter().map(|e| Op::AddElement(name, e, None)));
        }
        for (name, m) in &self.maps {
            ops.extend(
                m.elements
                    .iter()
                    .map(|(k, v)| Op::AddElement(name, k, Some(v))),
            );
        }
        for (name, m) in &self.endpoint_maps {
            ops.extend(range_ops(name, m));
        }
        ops
    }

    /// The steps of one transaction that turns `old` (what the kernel has) into `self`; empty
    /// when equal. Only changed chains are rewritten (flush and re-add) and only changed
    /// elements are touched.
    pub fn diff_ops<'a>(&'a self, old: &'a Ruleset) -> Vec<Op<'a>> {
        if self == old {
            return vec![];
        }
        let mut ops = vec![Op::AddTable];
        for (name, c) in &self.chains {
            if !old.chains.contains_key(name) {
                ops.push(Op::AddChain(name, c));
            }
        }
        for (name, s) in &self.sets {
            if !old.sets.contains_key(name) {
                ops.push(Op::AddSet(name, s));
            }
        }
        for (name, m) in &self.maps {
            if !old.maps.contains_key(name) {
                ops.push(Op::AddMap(name, m));
            }
        }
        for (name, m) in &self.endpoint_maps {
            match old.endpoint_maps.get(name) {
                None => ops.push(Op::AddEndpointMap(name, m)),
                Some(o) if o == m => continue,
                Some(_) => ops.push(Op::FlushElements(name)),
            }
            ops.extend(range_ops(name, m));
        }
        // Stale elements go first: they may point at chains deleted below.
        for (name, m) in &old.maps {
            let new = self.maps.get(name);
            for (k, v) in &m.elements {
                if new.is_some_and(|n| n.elements.get(k) != Some(v)) {
                    ops.push(Op::DeleteElement(name, k));
                }
            }
        }
        for (name, s) in &old.sets {
            if let Some(n) = self.sets.get(name) {
                for e in s.elements.difference(&n.elements) {
                    ops.push(Op::DeleteElement(name, e));
                }
            }
        }
        for (name, c) in &self.chains {
            match old.chains.get(name) {
                Some(o) if o.rules == c.rules => continue,
                Some(_) => ops.push(Op::FlushChain(name)),
                None => {}
            }
            ops.extend(c.rules.iter().map(|r| Op::AddRule(name, r)));
        }
        for (name, s) in &self.sets {
            let had = old.sets.get(name).map(|o| &o.elements);
            for e in &s.elements {
                if !had.is_some_and(|h| h.contains(e)) {
                    ops.push(Op::AddElement(name, e, None));
                }
            }
        }
        for (name, m) in &self.maps {
            let had = old.maps.get(name);
            for (k, v) in &m.elements {
                if had.and_then(|o| o.elements.get(k)) != Some(v) {
                    ops.push(Op::AddElement(name, k, Some(v)));
                }
            }
        }
        // A stale chain may jump to another stale chain or use a stale set: flush all first;
        // a stale map may name a stale chain: delete maps before chains.
        let stale: Vec<&String> = old
            .chains
            .keys()
            .filter(|n| !self.chains.contains_key(*n))
            .collect();
        ops.extend(stale.iter().map(|n| Op::FlushChain(n)));
        for name in old.maps.keys().filter(|n| !self.maps.contains_key(*n)) {
            ops.push(Op::DeleteMap(name));
        }
        for name in old.sets.keys().filter(|n| !self.sets.contains_key(*n)) {
            ops.push(Op::DeleteSet(name));
        }
        for name in old
            .endpoint_maps
            .keys()
            .filter(|n| !self.endpoint_maps.contains_key(*n))
        {
            ops.push(Op::DeleteMap(name));
        }
        ops.extend(stale.iter().map(|n| Op::DeleteChain(n)));
        ops
    }

    /// One transaction that replaces the table, in nft's block syntax with each set's elements
    /// in one list: nft loads that about a third faster than one command per object.
    pub fn render_full(&self) -> String {
        let t = &self.table;
        let mut out = String::new();
        let _ = writeln!(out, "add table ip {t}");
        let _ = writeln!(out, "delete table ip {t}");
        let _ = writeln!(out, "table ip {t} {{");
        for (name, c) in &self.chains {
            let _ = writeln!(out, "\tchain {name} {{");
            if let Some(b) = &c.base {
                let _ = writeln!(out, "\t\t{}", base_spec(b));
            }
            for r in &c.rules {
                let _ = writeln!(out, "\t\t{r}");
            }
            let _ = writeln!(out, "\t}}");
        }
        for (name, s) in &self.sets {
            let _ = writeln!(out, "\tset {name} {{ {}", set_spec(s));
            if !s.elements.is_empty() {
                let elems: Vec<String> = s.elements.iter().map(Key::to_string).collect();
                let _ = writeln!(out, "\t\telements = {{ {} }}", elems.join(", "));
            }
            let _ = writeln!(out, "\t}}");
        }
        for (name, m) in &self.endpoint_maps {
            let _ = writeln!(out, "\tmap {name} {{ {}", endpoint_map_spec(m));
            let elems: Vec<String> = m
                .ranges()
                .map(|(first, last, ip, port)| format!("{first}-{last} : {ip} . {port}"))
                .collect();
            if !elems.is_empty() {
                let _ = writeln!(out, "\t\telements = {{ {} }}", elems.join(", "));
            }
            let _ = writeln!(out, "\t}}");
        }
        for (name, m) in &self.maps {
            let _ = writeln!(out, "\tmap {name} {{ type {} : verdict ;", m.key.as_str());
            if !m.elements.is_empty() {
                let elems: Vec<String> = m
                    .elements
                    .iter()
                    .map(|(k, v)| format!("{k} : {v}"))
                    .collect();
                let _ = writeln!(out, "\t\telements = {{ {} }}", elems.join(", "));
            }
            let _ = writeln!(out, "\t}}");
        }
        let _ = writeln!(out, "}}");
        out
    }

    /// The replacing transaction of `full_ops`, one nft command per line: what tests and people
    /// grep.
    pub fn render_commands(&self) -> String {
        render_ops(&self.table, &self.full_ops())
    }

    /// The transaction of `diff_ops` as nft commands; None when equal.
    pub fn render_diff(&self, old: &Ruleset) -> Option<String> {
        let ops = self.diff_ops(old);
        (!ops.is_empty()).then(|| render_ops(&self.table, &ops))
    }
}

fn render_ops(table: &str, ops: &[Op<'_>]) -> String {
    let mut out = String::new();
    for op in ops {
        out.push_str(&op.render(table));
        out.push('\n');
    }
    out
}

fn base_spec(b: &BaseChain) -> String {
    format!(
        "type {} hook {} priority {} ;",
        b.kind.as_str(),
        b.hook.as_str(),
        b.priority
    )
}

fn endpoint_map_spec(m: &EndpointMap) -> String {
    format!(
        "typeof numgen random mod {ENDPOINT_RANGE} : ip daddr . {} dport ; flags interval ;",
        m.protocol.nft()
    )
}

fn range_ops<'a>(name: &'a str, m: &'a EndpointMap) -> impl Iterator<Item = Op<'a>> + 'a {
    m.ranges()
        .map(move |(first, last, ip, port)| Op::AddRange(name, first, last, ip, port))
}

fn set_spec(s: &Set) -> String {
    let mut spec = format!("type {} ;", s.key.as_str());
    if let Some(to) = s.timeout {
        let _ = write!(spec, " flags dynamic,timeout ; timeout {to}s ;");
    }
    spec
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Key::Addr(a) => write!(f, "{a}"),
            Key::AddrProtoPort(a, p, port) => write!(f, "{a} . {} . {port}", p.nft()),
            Key::ProtoPort(p, port) => write!(f, "{} . {port}", p.nft()),
            Key::AddrAddr(a, b) => write!(f, "{a} . {b}"),
        }
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::Jump(c) => write!(f, "jump {c}"),
            Verdict::Goto(c) => write!(f, "goto {c}"),
            Verdict::Return => f.write_str("return"),
            Verdict::Drop => f.write_str("drop"),
        }
    }
}

impl fmt::Display for Match {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Match::CtStateNew => f.write_str("ct state new"),
            Match::Addr { field, negate, net } => {
                write!(f, "ip {} ", field.as_str())?;
                if *negate {
                    f.write_str("!= ")?;
                }
                if net.prefix_len() == 32 {
                    write!(f, "{}", net.addr())
                } else {
                    write!(f, "{}", net.trunc())
                }
            }
            Match::AddrIn { field, set } => write!(f, "ip {} @{set}", field.as_str()),
            Match::L4Proto(p) => write!(f, "meta l4proto {}", p.nft()),
            Match::Dport(p, port) => write!(f, "{} dport {port}", p.nft()),
            Match::NumgenZero(n) => write!(f, "numgen random mod {n} == 0"),
            Match::FibSaddrLocal => f.write_str("fib saddr type local"),
            Match::MarkClear(m) => write!(f, "meta mark & {m:#x} == 0"),
            Match::CtStatusDnat => f.write_str("ct status dnat"),
            Match::AddrPairIn(set) => write!(f, "ip saddr . ip daddr @{set}"),
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::Verdict(v) => write!(f, "{v}"),
            Action::Vmap(KeyType::AddrProtoPort, m) => {
                write!(f, "ip daddr . meta l4proto . th dport vmap @{m}")
            }
            Action::Vmap(KeyType::ProtoPort, m) => write!(f, "meta l4proto . th dport vmap @{m}"),
            Action::Vmap(KeyType::Addr, m) => write!(f, "ip daddr vmap @{m}"),
            Action::Vmap(KeyType::AddrAddr, m) => write!(f, "ip saddr . ip daddr vmap @{m}"),
            Action::MarkOr(m) => write!(f, "meta mark set meta mark | {m:#x}"),
            Action::MarkXor(m) => write!(f, "meta mark set meta mark ^ {m:#x}"),
            Action::MasqueradeFullyRandom => f.write_str("masquerade fully-random"),
            Action::RejectTcpReset => f.write_str("reject with tcp reset"),
            Action::Reject => f.write_str("reject"),
            Action::UpdateSaddr(s) => write!(f, "update @{s} {{ ip saddr }}"),
            Action::Dnat(ip, port) => write!(f, "dnat to {ip}:{port}"),
            Action::DnatRandom(m) => {
                write!(f, "dnat ip to numgen random mod {ENDPOINT_RANGE} map @{m}")
            }
        }
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for m in &self.matches {
            write!(f, "{m} ")?;
        }
        write!(f, "{}", self.action)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn goto(c: &str) -> Rule {
        Rule::verdict(vec![], Verdict::Goto(c.into()))
    }

    fn small() -> Ruleset {
        let mut r = Ruleset::new("t");
        r.chains.insert(
            "nat-output".into(),
            Chain {
                base: Some(BaseChain {
                    kind: ChainType::Nat,
                    hook: Hook::Output,
                    priority: "dstnat",
                }),
                rules: vec![Rule::verdict(vec![], Verdict::Jump("services".into()))],
            },
        );
        r.chains.insert(
            "services".into(),
            Chain {
                base: None,
                rules: vec![Rule::new(
                    vec![],
                    Action::Vmap(KeyType::AddrProtoPort, "service-ips".into()),
                )],
            },
        );
        r.chains.insert(
            "svc-a".into(),
            Chain {
                base: None,
                rules: vec![Rule::new(
                    vec![],
                    Action::Dnat("10.0.0.1".parse().unwrap(), 80),
                )],
            },
        );
        let mut m = Map::new(KeyType::AddrProtoPort);
        m.elements.insert(
            Key::AddrProtoPort("10.96.0.5".parse().unwrap(), Protocol::Tcp, 80),
            Verdict::Goto("svc-a".into()),
        );
        r.maps.insert("service-ips".into(), m);
        let mut s = Set::new(KeyType::Addr);
        s.elements.insert(Key::Addr("10.96.0.5".parse().unwrap()));
        r.sets.insert("cluster-ips".into(), s);
        r
    }

    #[test]
    fn commands_replace_the_table_in_dependency_order() {
        assert_eq!(
            small().render_commands(),
            "add table ip t
delete table ip t
add table ip t
add chain ip t nat-output { type nat hook output priority dstnat ; }
add chain ip t services
add chain ip t svc-a
add set ip t cluster-ips { type ipv4_addr ; }
add map ip t service-ips { type ipv4_addr . inet_proto . inet_service : verdict ; }
add rule ip t nat-output jump services
add rule ip t services ip daddr . meta l4proto . th dport vmap @service-ips
add rule ip t svc-a dnat to 10.0.0.1:80
add element ip t cluster-ips { 10.96.0.5 }
add element ip t service-ips { 10.96.0.5 . tcp . 80 : goto svc-a }
"
        );
    }

    #[test]
    fn full_replaces_the_table_in_one_block() {
        assert_eq!(
            small().render_full(),
            "add table ip t
delete table ip t
table ip t {
\tchain nat-output {
\t\ttype nat hook output priority dstnat ;
\t\tjump services
\t}
\tchain services {
\t\tip daddr . meta l4proto . th dport vmap @service-ips
\t}
\tchain svc-a {
\t\tdnat to 10.0.0.1:80
\t}
\tset cluster-ips { type ipv4_addr ;
\t\telements = { 10.96.0.5 }
\t}
\tmap service-ips { type ipv4_addr . inet_proto . inet_service : verdict ;
\t\telements = { 10.96.0.5 . tcp . 80 : goto svc-a }
\t}
}
"
        );
    }

    #[test]
    fn equal_states_have_no_diff() {
        assert_eq!(small().render_diff(&small()), None);
        assert!(small().diff_ops(&small()).is_empty());
    }

    #[test]
    fn diff_touches_only_what_changed() {
        let old = small();
        let mut new = small();
        new.chains.remove("svc-a");
        new.chains.insert(
            "svc-b".into(),
            Chain {
                base: None,
                rules: vec![Rule::new(
                    vec![],
                    Action::Dnat("10.0.0.2".parse().unwrap(), 80),
                )],
            },
        );
        let m = new.maps.get_mut("service-ips").unwrap();
        m.elements.insert(
            Key::AddrProtoPort("10.96.0.5".parse().unwrap(), Protocol::Tcp, 80),
            Verdict::Goto("svc-b".into()),
        );
        let s = new.sets.get_mut("cluster-ips").unwrap();
        s.elements.insert(Key::Addr("10.96.0.6".parse().unwrap()));
        assert_eq!(
            new.render_diff(&old).unwrap(),
            "add table ip t
add chain ip t svc-b
delete element ip t service-ips { 10.96.0.5 . tcp . 80 }
add rule ip t svc-b dnat to 10.0.0.2:80
add element ip t cluster-ips { 10.96.0.6 }
add element ip t service-ips { 10.96.0.5 . tcp . 80 : goto svc-b }
flush chain ip t svc-a
delete chain ip t svc-a
"
        );
    }

    #[test]
    fn diff_rewrites_a_changed_chain_and_drops_removed_elements() {
        let old = small();
        let mut new = small();
        new.chains.get_mut("svc-a").unwrap().rules = vec![goto("svc-c")];
        new.sets.get_mut("cluster-ips").unwrap().elements.clear();
        assert_eq!(
            new.render_diff(&old).unwrap(),
            "add table ip t
delete element ip t cluster-ips { 10.96.0.5 }
flush chain ip t svc-a
add rule ip t svc-a goto svc-c
"
        );
    }

    #[test]
    fn sets_with_timeouts_render_their_flags() {
        let mut r = Ruleset::new("t");
        let mut s = Set::new(KeyType::Addr);
        s.timeout = Some(10800);
        r.sets.insert("affinity-x".into(), s);
        assert!(r.render_commands().contains(
            "add set ip t affinity-x { type ipv4_addr ; flags dynamic,timeout ; timeout 10800s ; }\n"
        ));
    }

    #[test]
    fn rules_render_as_nft_writes_them() {
        let net: Ipv4Net = "10.244.0.0/16".parse().unwrap();
        let r = Rule::verdict(
            vec![
                Match::Addr {
                    field: Addr::Daddr,
                    negate: false,
                    net: "10.96.0.10/32".parse().unwrap(),
                },
                Match::Dport(Protocol::Tcp, 80),
                Match::Addr {
                    field: Addr::Saddr,
                    negate: true,
                    net,
                },
            ],
            Verdict::Jump("mark".into()),
        );
        assert_eq!(
            r.to_string(),
            "ip daddr 10.96.0.10 tcp dport 80 ip saddr != 10.244.0.0/16 jump mark"
        );
        assert_eq!(
            Rule::verdict(vec![Match::MarkClear(0x4000)], Verdict::Return).to_string(),
            "meta mark & 0x4000 == 0 return"
        );
    }
}
