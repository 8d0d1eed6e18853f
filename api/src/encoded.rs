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

/// A `DeltaDiscoveryResponse`, already encoded, as a chain of byte
/// pieces: its resources are the [`EncodedResource`]s themselves (shared,
/// not copied), between a small encoded head and tail.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EncodedDeltaResponse {
    parts: Vec<Bytes>,
    len: usize,
}

/// A [`Resource`], encoded once, as field `resources` of a
/// `DeltaDiscoveryResponse` (its key and length come first), so a response
/// is the concatenation of such pieces.
#[derive(Clone, Debug)]
pub struct EncodedResource {
    field: Bytes,
    /// Length of the key and length prefix in `field`.
    prefix: usize,
}

impl EncodedResource {
    /// Encodes `resource`.
    pub fn new(resource: &Resource) -> Self {
        let len = resource.encoded_len();
        let mut buf = BytesMut::with_capacity(
            encoded_len_varint(u64::from(RESOURCES << 3)) + encoded_len_varint(len as u64) + len,
        );
        encode_key(RESOURCES, WireType::LengthDelimited, &mut buf);
        encode_varint(len as u64, &mut buf);
        let prefix = buf.len();
        resource.encode_raw(&mut buf);
        Self {
            field: buf.freeze(),
            prefix,
        }
    }

    /// The encoded `Resource` message.
    pub fn as_bytes(&self) -> Bytes {
        self.field.slice(self.prefix..)
    }
}

// Field numbers of envoy.service.discovery.v3.DeltaDiscoveryResponse.
const SYSTEM_VERSION_INFO: u32 = 1;
const RESOURCES: u32 = 2;
const TYPE_URL: u32 = 4;
const NONCE: u32 = 5;
const REMOVED_RESOURCES: u32 = 6;

impl EncodedDeltaResponse {
    /// Assembles a response; the resources' bytes are shared, not copied.
    pub fn new<'a>(
        system_version_info: &str,
        type_url: &str,
        nonce: &str,
        resources: impl ExactSizeIterator<Item = &'a EncodedResource>,
        removed: &[String],
    ) -> Self {
        let put = |tag: u32, bytes: &[u8], buf: &mut BytesMut| {
            if !bytes.is_empty() {
                encode_key(tag, WireType::LengthDelimited, buf);
                encode_varint(bytes.len() as u64, buf);
                buf.put_slice(bytes);
            }
        };
        let mut parts = Vec::with_capacity(resources.len() + 2);
        let mut head = BytesMut::new();
        put(
            SYSTEM_VERSION_INFO,
            system_version_info.as_bytes(),
            &mut head,
        );
        parts.push(head.freeze());
        parts.extend(resources.map(|r| r.field.clone()));
        let mut tail = BytesMut::new();
        put(TYPE_URL, type_url.as_bytes(), &mut tail);
        put(NONCE, nonce.as_bytes(), &mut tail);
        for name in removed {
            // An empty name is still a removed entry: always framed.
            encode_key(REMOVED_RESOURCES, WireType::LengthDelimited, &mut tail);
            encode_varint(name.len() as u64, &mut tail);
            tail.put_slice(name.as_bytes());
        }
        parts.push(tail.freeze());
        let len = parts.iter().map(Bytes::len).sum();
        Self { parts, len }
    }
}

impl Message for EncodedDeltaResponse {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        for part in &self.parts {
            buf.put_slice(part);
        }
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
        self.len
    }

    fn clear(&mut self) {
        *self = Self::default();
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
        assert_eq!(
            Resource::decode(encoded[0].as_bytes()).unwrap(),
            decoded.resources[0]
        );
        let empty = EncodedDeltaResponse::new("", "", "", [].iter(), &[]);
        assert_eq!(empty.encoded_len(), 0);
    }
}
