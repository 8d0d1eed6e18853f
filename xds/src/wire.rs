//! The client's view of a `DeltaDiscoveryResponse`: the fields it reads,
//! with field numbers as in Envoy's `discovery.proto`, and each resource's
//! message kept as a slice of the received buffer (`Bytes`) instead of a
//! copy. Fields the client never reads (`system_version_info`, the `Any`'s
//! `type_url`, aliases, TTL) are skipped by the decoder.

use bytes::Bytes;

/// `envoy.service.discovery.v3.DeltaDiscoveryResponse`, as received.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct DeltaResponse {
    /// `resources`.
    #[prost(message, repeated, tag = "2")]
    pub resources: Vec<WireResource>,
    /// `type_url`.
    #[prost(string, tag = "4")]
    pub type_url: String,
    /// `nonce`.
    #[prost(string, tag = "5")]
    pub nonce: String,
    /// `removed_resources`.
    #[prost(string, repeated, tag = "6")]
    pub removed_resources: Vec<String>,
}

/// `envoy.service.discovery.v3.Resource`, as received.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct WireResource {
    /// `version`.
    #[prost(string, tag = "1")]
    pub version: String,
    /// `resource`.
    #[prost(message, optional, tag = "2")]
    pub resource: Option<WireAny>,
    /// `name`.
    #[prost(string, tag = "3")]
    pub name: String,
}

/// `google.protobuf.Any`: only its `value`.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct WireAny {
    /// `value`.
    #[prost(bytes = "bytes", tag = "2")]
    pub value: Bytes,
}

#[cfg(test)]
mod tests {
    use mesh_api::envoy::{
        envoy::service::discovery::v3::{DeltaDiscoveryResponse, Resource},
        google::protobuf::Any,
    };
    use prost::Message;

    use super::*;

    #[test]
    fn decodes_what_envoy_encodes() {
        let response = DeltaDiscoveryResponse {
            system_version_info: "3".into(),
            resources: vec![Resource {
                name: "ns/a".into(),
                version: "00ff".into(),
                aliases: vec!["alias".into()],
                resource: Some(Any {
                    type_url: "type.googleapis.com/x".into(),
                    value: vec![1, 2, 3],
                }),
                ..Default::default()
            }],
            type_url: "type.googleapis.com/x".into(),
            nonce: "3-1".into(),
            removed_resources: vec!["ns/gone".into()],
            ..Default::default()
        };
        let view = DeltaResponse::decode(Bytes::from(response.encode_to_vec())).unwrap();
        assert_eq!(
            view,
            DeltaResponse {
                resources: vec![WireResource {
                    version: "00ff".into(),
                    resource: Some(WireAny {
                        value: Bytes::from_static(&[1, 2, 3]),
                    }),
                    name: "ns/a".into(),
                }],
                type_url: "type.googleapis.com/x".into(),
                nonce: "3-1".into(),
                removed_resources: vec!["ns/gone".into()],
            }
        );
    }
}
