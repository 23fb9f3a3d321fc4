//! The desired nftables state of one `ip` table as typed data, and its rendering to `nft -f -`
//! text: a full definition (one atomic replace) or the difference from a previous state.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;

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

/// What makes a chain a base chain: the kernel calls it from `hook` at `priority`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseChain {
    pub kind: ChainType,
    pub hook: Hook,
    /// nft priority expression, e.g. `dstnat - 10`.
    pub priority: &'static str,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Chain {
    pub base: Option<BaseChain>,
    /// Rule statements, in order, as nft text.
    pub rules: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Set {
    /// nft key type, e.g. `ipv4_addr`.
    pub key: &'static str,
    /// nft set flags, e.g. `dynamic,timeout`.
    pub flags: Option<&'static str>,
    /// Default element timeout in seconds.
    pub timeout: Option<u32>,
    pub elements: BTreeSet<String>,
}

impl Set {
    pub fn new(key: &'static str) -> Set {
        Set {
            key,
            flags: None,
            timeout: None,
            elements: BTreeSet::new(),
        }
    }
}

/// A verdict map: key text to verdict text (`goto chain`, `drop`, ...).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Map {
    pub key: &'static str,
    pub elements: BTreeMap<String, String>,
}

impl Map {
    pub fn new(key: &'static str) -> Map {
        Map {
            key,
            elements: BTreeMap::new(),
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
}

impl Ruleset {
    pub fn new(table: impl Into<String>) -> Ruleset {
        Ruleset {
            table: table.into(),
            chains: BTreeMap::new(),
            sets: BTreeMap::new(),
            maps: BTreeMap::new(),
        }
    }

    /// One transaction that replaces whatever table of this name exists (or none) by this one,
    /// in nft's block syntax with each set's elements in one list: loads about a third faster
    /// than one command per object (2.4 s against 3.6 s for 10,000 Services).
    pub fn render_full(&self) -> String {
        let t = &self.table;
        let mut out = String::new();
        // `add` first so that `delete` cannot fail on a missing table.
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
                let elems: Vec<&str> = s.elements.iter().map(String::as_str).collect();
                let _ = writeln!(out, "\t\telements = {{ {} }}", elems.join(", "));
            }
            let _ = writeln!(out, "\t}}");
        }
        for (name, m) in &self.maps {
            let _ = writeln!(out, "\tmap {name} {{ type {} : verdict ;", m.key);
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

    /// The same replacing transaction as `render_full`, one command per object: what tests and
    /// people grep.
    pub fn render_commands(&self) -> String {
        let t = &self.table;
        let mut out = String::new();
        // `add` first so that `delete` cannot fail on a missing table.
        let _ = writeln!(out, "add table ip {t}");
        let _ = writeln!(out, "delete table ip {t}");
        let _ = writeln!(out, "add table ip {t}");
        for (name, c) in &self.chains {
            self.add_chain(&mut out, name, c);
        }
        for (name, s) in &self.sets {
            self.add_set(&mut out, name, s);
        }
        for (name, m) in &self.maps {
            let _ = writeln!(
                out,
                "add map ip {t} {name} {{ type {} : verdict ; }}",
                m.key
            );
        }
        for (name, c) in &self.chains {
            for r in &c.rules {
                let _ = writeln!(out, "add rule ip {t} {name} {r}");
            }
        }
        for (name, s) in &self.sets {
            for e in &s.elements {
                let _ = writeln!(out, "add element ip {t} {name} {{ {e} }}");
            }
        }
        for (name, m) in &self.maps {
            for (k, v) in &m.elements {
                let _ = writeln!(out, "add element ip {t} {name} {{ {k} : {v} }}");
            }
        }
        out
    }

    /// One transaction that turns `old` (what the kernel has) into `self`; None when equal.
    /// Only changed chains are rewritten and only changed elements are touched.
    pub fn render_diff(&self, old: &Ruleset) -> Option<String> {
        if self == old {
            return None;
        }
        let t = &self.table;
        let mut out = String::new();
        let _ = writeln!(out, "add table ip {t}");
        for (name, c) in &self.chains {
            if !old.chains.contains_key(name) {
                self.add_chain(&mut out, name, c);
            }
        }
        for (name, s) in &self.sets {
            if !old.sets.contains_key(name) {
                self.add_set(&mut out, name, s);
            }
        }
        for (name, m) in &self.maps {
            if !old.maps.contains_key(name) {
                let _ = writeln!(
                    out,
                    "add map ip {t} {name} {{ type {} : verdict ; }}",
                    m.key
                );
            }
        }
        // Stale elements go first: they may point at chains deleted below.
        for (name, m) in &old.maps {
            let new = self.maps.get(name);
            for (k, v) in &m.elements {
                if new.is_some_and(|n| n.elements.get(k) != Some(v)) {
                    let _ = writeln!(out, "delete element ip {t} {name} {{ {k} }}");
                }
            }
        }
        for (name, s) in &old.sets {
            if let Some(n) = self.sets.get(name) {
                for e in s.elements.difference(&n.elements) {
                    let _ = writeln!(out, "delete element ip {t} {name} {{ {e} }}");
                }
            }
        }
        for (name, c) in &self.chains {
            match old.chains.get(name) {
                Some(o) if o.rules == c.rules => continue,
                Some(_) => {
                    let _ = writeln!(out, "flush chain ip {t} {name}");
                }
                None => {}
            }
            for r in &c.rules {
                let _ = writeln!(out, "add rule ip {t} {name} {r}");
            }
        }
        for (name, s) in &self.sets {
            let empty = BTreeSet::new();
            let had = old.sets.get(name).map_or(&empty, |o| &o.elements);
            for e in s.elements.difference(had) {
                let _ = writeln!(out, "add element ip {t} {name} {{ {e} }}");
            }
        }
        for (name, m) in &self.maps {
            let had = old.maps.get(name);
            for (k, v) in &m.elements {
                if had.and_then(|o| o.elements.get(k)) != Some(v) {
                    let _ = writeln!(out, "add element ip {t} {name} {{ {k} : {v} }}");
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
        for name in &stale {
            let _ = writeln!(out, "flush chain ip {t} {name}");
        }
        for name in old.maps.keys().filter(|n| !self.maps.contains_key(*n)) {
            let _ = writeln!(out, "delete map ip {t} {name}");
        }
        for name in old.sets.keys().filter(|n| !self.sets.contains_key(*n)) {
            let _ = writeln!(out, "delete set ip {t} {name}");
        }
        for name in &stale {
            let _ = writeln!(out, "delete chain ip {t} {name}");
        }
        Some(out)
    }

    fn add_chain(&self, out: &mut String, name: &str, c: &Chain) {
        let t = &self.table;
        match &c.base {
            Some(b) => {
                let _ = writeln!(out, "add chain ip {t} {name} {{ {} }}", base_spec(b));
            }
            None => {
                let _ = writeln!(out, "add chain ip {t} {name}");
            }
        }
    }

    fn add_set(&self, out: &mut String, name: &str, s: &Set) {
        let _ = writeln!(
            out,
            "add set ip {} {name} {{ {} }}",
            self.table,
            set_spec(s)
        );
    }
}

fn base_spec(b: &BaseChain) -> String {
    let kind = match b.kind {
        ChainType::Filter => "filter",
        ChainType::Nat => "nat",
    };
    format!(
        "type {kind} hook {} priority {} ;",
        b.hook.as_str(),
        b.priority
    )
}

fn set_spec(s: &Set) -> String {
    let mut spec = format!("type {} ;", s.key);
    if let Some(f) = s.flags {
        let _ = write!(spec, " flags {f} ;");
    }
    if let Some(to) = s.timeout {
        let _ = write!(spec, " timeout {to}s ;");
    }
    spec
}

#[cfg(test)]
mod tests {
    use super::*;

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
                rules: vec!["jump services".into()],
            },
        );
        r.chains.insert(
            "services".into(),
            Chain {
                base: None,
                rules: vec!["ip daddr . meta l4proto . th dport vmap @service-ips".into()],
            },
        );
        r.chains.insert(
            "svc-a".into(),
            Chain {
                base: None,
                rules: vec!["dnat to 10.0.0.1:80".into()],
            },
        );
        let mut m = Map::new("ipv4_addr . inet_proto . inet_service");
        m.elements
            .insert("10.96.0.5 . tcp . 80".into(), "goto svc-a".into());
        r.maps.insert("service-ips".into(), m);
        let mut s = Set::new("ipv4_addr");
        s.elements.insert("10.96.0.5".into());
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
                rules: vec!["dnat to 10.0.0.2:80".into()],
            },
        );
        let m = new.maps.get_mut("service-ips").unwrap();
        m.elements
            .insert("10.96.0.5 . tcp . 80".into(), "goto svc-b".into());
        let s = new.sets.get_mut("cluster-ips").unwrap();
        s.elements.insert("10.96.0.6".into());
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
        new.chains.get_mut("svc-a").unwrap().rules = vec!["dnat to 10.0.0.3:80".into()];
        new.sets.get_mut("cluster-ips").unwrap().elements.clear();
        assert_eq!(
            new.render_diff(&old).unwrap(),
            "add table ip t
delete element ip t cluster-ips { 10.96.0.5 }
flush chain ip t svc-a
add rule ip t svc-a dnat to 10.0.0.3:80
"
        );
    }

    #[test]
    fn sets_with_timeouts_render_their_flags() {
        let mut r = Ruleset::new("t");
        let mut s = Set::new("ipv4_addr");
        s.flags = Some("dynamic,timeout");
        s.timeout = Some(10800);
        r.sets.insert("affinity-x".into(), s);
        assert!(r.render_commands().contains(
            "add set ip t affinity-x { type ipv4_addr ; flags dynamic,timeout ; timeout 10800s ; }\n"
        ));
    }
}
