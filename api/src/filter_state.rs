//! Filter-state keys a waypoint route can match (`RouteMatch.filter_state`):
//! what the control plane writes for a VirtualService's `sourceNamespace`
//! and `sourceLabels`, and what the waypoint fills in per request.

/// The caller's SPIFFE identity, as its HBONE client certificate proved
/// it; matched with `string_match` (Istio's key).
pub const PEER_PRINCIPAL: &str = "io.istio.peer_principal";

/// The original client's address (HBONE `forwarded: for=`, else the
/// connection's peer); matched with `address_match`.
pub const SOURCE_ADDRESS: &str = "io.istio.source_address";
