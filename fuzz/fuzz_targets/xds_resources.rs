//! Any bytes as xDS resources of ztunnel's two types: the stores accept or
//! NACK them, never panic, and a NACK leaves what they held unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_api::type_url;
use mesh_xds::{Resource, Update};
use ztunnel::{discovery::Discovery, policy::PolicyStore};

fn update(type_url: &str, name: &str, value: &[u8]) -> Update {
    Update {
        type_url: type_url.to_owned(),
        resources: vec![Resource {
            name: name.to_owned(),
            value: value.to_vec().into(),
        }],
        removed: Vec::new(),
    }
}

fuzz_target!(|data: &[u8]| {
    let discovery = Discovery::default();
    let before = discovery.dump();
    if discovery
        .apply(update(type_url::ADDRESS, "fuzz", data))
        .is_err()
    {
        assert_eq!(
            discovery.dump(),
            before,
            "a NACKed address changed the store"
        );
    }
    let policies = PolicyStore::new("istio-system");
    if policies
        .apply(update(type_url::AUTHORIZATION, "ns/fuzz", data))
        .is_err()
    {
        assert_eq!(
            policies.dump(),
            PolicyStore::new("istio-system").dump(),
            "a NACKed policy was kept"
        );
    }
});
