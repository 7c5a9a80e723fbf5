//! Planning a whole inventory: which host each host is reached through
//! (its own `arbor_via`/`mitogen_via`, else the CIDR rules of
//! `arbor_via_rules`), checked for cycles, and the tree that results, each
//! relay once whoever declared it. `arbor plan` prints it; the glue applies
//! the same rules per task (checked against the same golden cases).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::Serialize;
use serde_json::Value;

use crate::{TopologyError, CHAIN_HOPS_MAX};

/// Most rules accepted in one `arbor_via_rules`.
pub const RULES_MAX: usize = 4096;

/// Targets whose address is in `net` are reached through `via`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ViaRule {
    pub net: IpNet,
    /// As `mitogen_via` takes it: `[user@]host`.
    pub via: String,
}

/// Rules from the value of `arbor_via_rules`: a mapping of CIDR to via
/// host (`{"10.1.0.0/16": "bastion.dc1"}`), or a list of such mappings.
pub fn parse_rules(value: &Value) -> Result<Vec<ViaRule>, TopologyError> {
    let bad = |why: String| TopologyError::Rules(why);
    let mut rules = Vec::new();
    let maps: Vec<&serde_json::Map<String, Value>> = match value {
        Value::Null => Vec::new(),
        Value::Object(m) => vec![m],
        Value::Array(items) => items
            .iter()
            .map(|v| {
                v.as_object()
                    .ok_or_else(|| bad(format!("list items must be mappings, not {v}")))
            })
            .collect::<Result<_, _>>()?,
        other => {
            return Err(bad(format!(
                "must be a mapping of CIDR to via host, not {other}"
            )))
        }
    };
    for m in maps {
        for (cidr, via) in m {
            let net: IpNet = cidr
                .trim()
                .parse()
                .map_err(|_| bad(format!("{cidr:?} is not a CIDR network (like 10.1.0.0/16)")))?;
            let via = via
                .as_str()
                .filter(|v| !v.trim().is_empty())
                .ok_or_else(|| bad(format!("{cidr}: the via host must be a name, not {via}")))?;
            let net = net.trunc();
            if rules.iter().any(|r: &ViaRule| r.net == net) {
                return Err(bad(format!("{net} appears twice")));
            }
            rules.push(ViaRule {
                net,
                via: via.trim().to_string(),
            });
        }
    }
    if rules.len() > RULES_MAX {
        return Err(bad(format!("{} rules, more than {RULES_MAX}", rules.len())));
    }
    Ok(rules)
}

/// The via that the rules give an address: the most specific network that
/// holds it. Only IP addresses match (names are resolved by ssh, later).
pub fn via_for<'a>(address: &str, rules: &'a [ViaRule]) -> Option<&'a str> {
    let ip: IpAddr = address.trim().parse().ok()?;
    rules
        .iter()
        .filter(|r| r.net.contains(&ip))
        .max_by_key(|r| r.net.prefix_len())
        .map(|r| r.via.as_str())
}

/// One inventory host as planning needs it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostSpec {
    pub name: String,
    /// ansible_host, else the name.
    pub address: String,
    /// `arbor_via`/`mitogen_via` if set at all; `Some("")` means direct.
    pub via: Option<String>,
    /// `ansible_connection`, if set.
    pub connection: Option<String>,
    pub rules: Vec<ViaRule>,
}

impl HostSpec {
    /// From one host's variables (as `ansible-inventory --list` gives them).
    pub fn from_vars(name: &str, vars: &Value) -> Result<HostSpec, TopologyError> {
        let s = |k: &str| vars.get(k).and_then(Value::as_str).map(str::to_string);
        let via = match (vars.get("arbor_via"), vars.get("mitogen_via")) {
            (Some(v), _) | (None, Some(v)) => Some(v.as_str().unwrap_or("").to_string()),
            (None, None) => None,
        };
        let rules = parse_rules(vars.get("arbor_via_rules").unwrap_or(&Value::Null))
            .map_err(|e| TopologyError::Rules(format!("{name}: arbor_via_rules: {e}")))?;
        Ok(HostSpec {
            name: name.to_string(),
            address: s("ansible_host").unwrap_or_else(|| name.to_string()),
            via,
            connection: s("ansible_connection"),
            rules,
        })
    }

    /// The host this one is reached through, if any: its own via, else
    /// the rules (which never send a host through itself).
    pub fn via_host(&self) -> Option<String> {
        let strip = |v: &str| {
            let v = v.rsplit_once('@').map(|(_, h)| h).unwrap_or(v);
            let v = v.strip_prefix("ssh:").unwrap_or(v);
            v.trim().to_string()
        };
        match &self.via {
            Some(v) if v.trim().is_empty() => None,
            Some(v) => Some(strip(v)),
            None => via_for(&self.address, &self.rules)
                .map(strip)
                .filter(|v| *v != self.name),
        }
    }
}

/// The planned tree: hosts by the host they are reached through.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Plan {
    /// Outermost hop first, for each host.
    pub chains: BTreeMap<String, Vec<String>>,
    /// Each host's children in the tree ("" is the controller).
    pub children: BTreeMap<String, BTreeSet<String>>,
    pub addresses: BTreeMap<String, String>,
    /// Via hosts named but not in the inventory.
    pub unknown: BTreeSet<String>,
}

/// Plans every host of `hosts`: resolves each chain, refusing cycles and
/// chains over the bound, and names unknown via hosts as errors.
pub fn plan(hosts: &[HostSpec]) -> Result<Plan, TopologyError> {
    let by_name: BTreeMap<&str, &HostSpec> = hosts.iter().map(|h| (h.name.as_str(), h)).collect();
    let mut out = Plan::default();
    for h in hosts {
        // "" is the controller's place in the tree.
        if h.name.is_empty() {
            return Err(TopologyError::EmptyName);
        }
        let mut chain = vec![h.name.clone()];
        let mut cur: &HostSpec = h;
        while let Some(via) = cur.via_host() {
            if chain.contains(&via) {
                return Err(TopologyError::Cycle(cycle_text(&chain, &via)));
            }
            chain.push(via.clone());
            if chain.len() > CHAIN_HOPS_MAX {
                return Err(TopologyError::TooLong(chain.len()));
            }
            match by_name.get(via.as_str()) {
                Some(next) => cur = *next,
                None => {
                    out.unknown.insert(via);
                    break;
                }
            }
        }
        chain.reverse();
        let mut parent = String::new();
        for name in &chain {
            out.children
                .entry(parent.clone())
                .or_default()
                .insert(name.clone());
            parent = name.clone();
        }
        out.addresses.insert(h.name.clone(), h.address.clone());
        out.chains.insert(h.name.clone(), chain);
    }
    if let Some(u) = out.unknown.iter().next() {
        return Err(TopologyError::UnknownVia(u.clone()));
    }
    Ok(out)
}

/// "a -> b -> a": the cycle `chain` (target first) closes with `via`.
fn cycle_text(chain: &[String], via: &str) -> String {
    let start = chain.iter().position(|n| n == via).unwrap_or(0);
    let mut names: Vec<&str> = chain[start..].iter().map(String::as_str).collect();
    names.push(via);
    names.join(" -> ")
}

impl Plan {
    /// The tree as text, the controller at the root.
    pub fn render(&self) -> String {
        let mut s = String::from("controller\n");
        self.render_children("", "", &mut s);
        let relays = self
            .children
            .iter()
            .filter(|(k, v)| !k.is_empty() && !v.is_empty())
            .count();
        let depth = self.chains.values().map(Vec::len).max().unwrap_or(0);
        let _ = writeln!(
            s,
            "{} hosts, {} relays, {} direct, deepest chain {} hop(s)",
            self.chains.len(),
            relays,
            self.children.get("").map_or(0, BTreeSet::len),
            depth
        );
        s
    }

    fn render_children(&self, node: &str, indent: &str, s: &mut String) {
        let Some(kids) = self.children.get(node) else {
            return;
        };
        let n = kids.len();
        for (i, kid) in kids.iter().enumerate() {
            let last = i + 1 == n;
            let below = self.children.get(kid).map_or(0, BTreeSet::len);
            let addr = self.addresses.get(kid).map(String::as_str).unwrap_or("?");
            let role = if below > 0 {
                format!(" relay, {below} behind")
            } else {
                String::new()
            };
            let _ = writeln!(
                s,
                "{indent}{} {kid} ({addr}){role}",
                if last { "└─" } else { "├─" }
            );
            let deeper = format!("{indent}{}", if last { "   " } else { "│  " });
            self.render_children(kid, &deeper, s);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn host(name: &str, addr: &str, via: Option<&str>, rules: &[ViaRule]) -> HostSpec {
        HostSpec {
            name: name.into(),
            address: addr.into(),
            via: via.map(str::to_string),
            connection: None,
            rules: rules.to_vec(),
        }
    }

    #[test]
    fn a_host_without_a_name_is_refused() {
        // Found by the topology fuzz target: "" was its own child, and
        // rendering the tree recursed without end.
        let hosts = [host("", "10.0.0.1", None, &[])];
        assert_eq!(plan(&hosts), Err(TopologyError::EmptyName));
    }

    #[test]
    fn golden_rule_cases_match_the_glue() {
        let text = include_str!("../../tests/golden/via_rules.json");
        let golden: Value = serde_json::from_str(text).expect("golden json");
        let rules = parse_rules(&golden["rules"]).expect("rules");
        for case in golden["cases"].as_array().expect("cases") {
            let addr = case[0].as_str().expect("address");
            assert_eq!(via_for(addr, &rules), case[1].as_str(), "{addr}");
        }
        for bad in golden["bad"].as_array().expect("bad") {
            assert!(parse_rules(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn explicit_via_beats_rules_and_rules_skip_the_via_itself() {
        let rules = parse_rules(&json!({"10.1.0.0/16": "b1"})).expect("rules");
        let hosts = [
            host("b1", "10.1.0.5", None, &rules),
            host("t1", "10.1.2.3", None, &rules),
            host("t2", "10.1.2.4", Some("b2"), &rules),
            host("b2", "192.0.2.9", None, &rules),
            host("t3", "10.1.2.5", Some(""), &rules),
            host("t4", "t4.example", None, &rules),
        ];
        let p = plan(&hosts).expect("plan");
        assert_eq!(p.chains["b1"], ["b1"]);
        assert_eq!(p.chains["t1"], ["b1", "t1"]);
        assert_eq!(p.chains["t2"], ["b2", "t2"]);
        assert_eq!(p.chains["t3"], ["t3"]);
        assert_eq!(p.chains["t4"], ["t4"], "names are not matched");
        let text = p.render();
        assert!(text.contains("├─ b1 (10.1.0.5) relay, 1 behind"), "{text}");
        assert!(text.contains("6 hosts, 2 relays, 4 direct"), "{text}");
    }

    #[test]
    fn cycles_through_rules_and_unknown_vias_are_errors() {
        let rules =
            parse_rules(&json!([{"10.1.0.0/16": "b2"}, {"10.2.0.0/16": "b1"}])).expect("rules");
        let hosts = [
            host("b1", "10.1.0.1", None, &rules),
            host("b2", "10.2.0.1", None, &rules),
        ];
        match plan(&hosts) {
            Err(TopologyError::Cycle(c)) => assert_eq!(c, "b1 -> b2 -> b1"),
            other => panic!("{other:?}"),
        }
        let hosts = [host("t1", "10.9.0.1", Some("root@nowhere"), &[])];
        assert_eq!(
            plan(&hosts),
            Err(TopologyError::UnknownVia("nowhere".into()))
        );
    }

    #[test]
    fn deep_trees_dedup_every_relay() {
        let mut hosts = vec![host("gw", "192.0.2.1", None, &[])];
        for r in 0..3 {
            hosts.push(host(&format!("rack{r}"), "10.0.0.1", Some("gw"), &[]));
            for t in 0..4 {
                hosts.push(host(
                    &format!("t{r}{t}"),
                    "10.0.1.1",
                    Some(&format!("rack{r}")),
                    &[],
                ));
            }
        }
        let p = plan(&hosts).expect("plan");
        assert_eq!(p.children[""].len(), 1);
        assert_eq!(p.children["gw"].len(), 3);
        assert_eq!(p.chains["t21"], ["gw", "rack2", "t21"]);
        assert!(p
            .render()
            .contains("16 hosts, 4 relays, 1 direct, deepest chain 3"));
    }
}
