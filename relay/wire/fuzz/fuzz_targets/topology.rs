//! Fuzz what the controller decodes from the glue: a request's JSON, the
//! chain of hops in it (validated: depth bound, cycles), `arbor_via_rules`
//! and the whole-inventory plan built from hosts' variables.
#![no_main]

use arbor_topology::plan::{parse_rules, plan, HostSpec};
use arbor_topology::{validate, Hop, HopKey};
use arbor_wire::msg;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let Ok((json, _)) = msg::split(data) else {
        return;
    };
    let Ok(v) = serde_json::from_slice::<Value>(json) else {
        return;
    };
    if let Some(chain) = v.get("chain") {
        if let Ok(hops) = serde_json::from_value::<Vec<Hop>>(chain.clone()) {
            if validate(&hops).is_ok() {
                let _ = HopKey::of(&hops);
            }
        }
    }
    let _ = parse_rules(&v);
    if let Some(hosts) = v.as_object() {
        let specs: Vec<HostSpec> = hosts
            .iter()
            .filter_map(|(name, vars)| HostSpec::from_vars(name, vars).ok())
            .collect();
        if let Ok(p) = plan(&specs) {
            let _ = p.render();
        }
    }
});
