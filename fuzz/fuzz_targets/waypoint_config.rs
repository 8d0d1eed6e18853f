//! Any bytes as the waypoint's Envoy resources (listener, routes, cluster,
//! endpoints): each is compiled or NACKed, never a panic; a route table that
//! compiles then matches requests made from the same bytes without panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_api::{envoy::envoy::config::route::v3::RouteConfiguration, type_url};
use mesh_xds::{Handler, Resource, Update};
use prost::Message;
use std::sync::Arc;
use waypoint::{
    config::{Store, XdsHandler},
    route::RouteTable,
};

fuzz_target!(|data: &[u8]| {
    let (request, config) = data.split_at(
        data.len()
            .min(usize::from(data.first().copied().unwrap_or(0))),
    );
    let mut handler = XdsHandler::new(Arc::new(Store::default()));
    for type_url in [
        type_url::LISTENER,
        type_url::ROUTE,
        type_url::CLUSTER,
        type_url::ENDPOINT,
    ] {
        let _ = handler.apply(Update {
            type_url: type_url.to_owned(),
            resources: vec![Resource {
                name: "fuzz".to_owned(),
                value: config.to_vec().into(),
            }],
            removed: Vec::new(),
        });
    }
    let Ok(routes) = RouteConfiguration::decode(config) else {
        return;
    };
    let Ok(table) = RouteTable::compile(&routes) else {
        return;
    };
    // The request: lines of path, method, then `name: value` headers.
    let text = String::from_utf8_lossy(request);
    let mut lines = text.lines();
    let path = lines.next().unwrap_or("/");
    let method = lines.next().unwrap_or("GET");
    let mut builder = http::Request::builder().uri(path).method(method);
    for line in lines {
        if let Some((name, value)) = line.split_once(':') {
            builder = builder.header(name.trim(), value.trim());
        }
    }
    if let Ok(request) = builder.body(()) {
        let (parts, ()) = request.into_parts();
        let _ = table.find(&parts);
        let downstream = waypoint::route::Downstream {
            principal: "spiffe://cluster.local/ns/default/sa/client",
            address: std::net::IpAddr::from([10, 244, 0, 7]),
        };
        let _ = table.find_from(&parts, &downstream);
    }
});
