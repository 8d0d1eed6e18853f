//! Delta xDS responses assembled from pre-encoded resources.
//!
//! A control plane serving many proxies sends the same resources to each of
//! them. Encoding every [`Resource`] once, into bytes, and splicing those
//! bytes into each response saves a clone and a re-encode per resource per
//! proxy. The bytes produced are exactly those of a
//! `DeltaDiscoveryResponse` with the same fields.

use bytes::{BufMut, Bytes, BytesMut};
use prost::{
    DecodeError, Message,
    encoding::{DecodeContext, WireType, encode_key, encode_varint, encoded_len_varint},
};

use crate::envoy::envoy::service::discovery::v3::Resource;

/// A `DeltaDiscoveryResponse`, already encoded.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EncodedDeltaResponse(Bytes);

/// A [`Resource`], encoded once.
#[derive(Clone, Debug)]
pub struct EncodedResource(Bytes);

impl EncodedResource {
    /// Encodes `resource`.
    pub fn new(resource: &Resource) -> Self {
        Self(resource.encode_to_vec().into())
    }

    /// The encoded bytes.
    pub fn as_bytes(&self) -> &Bytes {
        &self.0
    }
}

// Field numbers of envoy.service.discovery.v3.DeltaDiscoveryResponse.
const SYSTEM_VERSION_INFO: u32 = 1;
const RESOURCES: u32 = 2;
const TYPE_URL: u32 = 4;
const NONCE: u32 = 5;
const REMOVED_RESOURCES: u32 = 6;

impl EncodedDeltaResponse {
    /// Assembles a response.
    pub fn new<'a>(
        system_version_info: &str,
        type_url: &str,
        nonce: &str,
        resources: impl ExactSizeIterator<Item = &'a EncodedResource> + Clone,
        removed: &[String],
    ) -> Self {
        let field = |tag: u32, len: usize| {
            encoded_len_varint(u64::from(tag << 3)) + encoded_len_varint(len as u64) + len
        };
        let non_empty = |s: &str, tag| if s.is_empty() { 0 } else { field(tag, s.len()) };
        let len = non_empty(system_version_info, SYSTEM_VERSION_INFO)
            + resources
                .clone()
                .map(|r| field(RESOURCES, r.0.len()))
                .sum::<usize>()
            + non_empty(type_url, TYPE_URL)
            + non_empty(nonce, NONCE)
            + removed
                .iter()
                .map(|r| field(REMOVED_RESOURCES, r.len()))
                .sum::<usize>();
        let mut buf = BytesMut::with_capacity(len);
        let put = |tag: u32, bytes: &[u8], buf: &mut BytesMut| {
            encode_key(tag, WireType::LengthDelimited, buf);
            encode_varint(bytes.len() as u64, buf);
            buf.put_slice(bytes);
        };
        if !system_version_info.is_empty() {
            put(
                SYSTEM_VERSION_INFO,
                system_version_info.as_bytes(),
                &mut buf,
            );
        }
        for resource in resources {
            put(RESOURCES, &resource.0, &mut buf);
        }
        if !type_url.is_empty() {
            put(TYPE_URL, type_url.as_bytes(), &mut buf);
        }
        if !nonce.is_empty() {
            put(NONCE, nonce.as_bytes(), &mut buf);
        }
        for name in removed {
            put(REMOVED_RESOURCES, name.as_bytes(), &mut buf);
        }
        Self(buf.freeze())
    }
}

impl Message for EncodedDeltaResponse {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        buf.put_slice(&self.0);
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl bytes::Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        // Send-only: a server never decodes its own responses.
        prost::encoding::skip_field(wire_type, tag, buf, ctx)
    }

    fn encoded_len(&self) -> usize {
        self.0.len()
    }

    fn clear(&mut self) {
        self.0 = Bytes::new();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envoy::{
        envoy::service::discovery::v3::DeltaDiscoveryResponse, google::protobuf::Any,
    };

    #[test]
    fn bytes_decode_as_the_envoy_message() {
        let resource = Resource {
            name: "ns/a".into(),
            version: "00ff".into(),
            resource: Some(Any {
                type_url: "type.googleapis.com/x".into(),
                value: vec![1, 2, 3],
            }),
            ..Default::default()
        };
        let encoded = [
            EncodedResource::new(&resource),
            EncodedResource::new(&resource),
        ];
        let response = EncodedDeltaResponse::new(
            "7",
            "type.googleapis.com/x",
            "7-1",
            encoded.iter(),
            &["ns/gone".to_owned()],
        );
        let decoded = DeltaDiscoveryResponse::decode(response.encode_to_vec().as_slice()).unwrap();
        assert_eq!(
            decoded,
            DeltaDiscoveryResponse {
                system_version_info: "7".into(),
                resources: vec![resource.clone(), resource],
                type_url: "type.googleapis.com/x".into(),
                nonce: "7-1".into(),
                removed_resources: vec!["ns/gone".into()],
                ..Default::default()
            }
        );
        assert_eq!(response.encoded_len(), response.encode_to_vec().len());
    }
}
