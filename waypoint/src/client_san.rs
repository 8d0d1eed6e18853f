//! Client certificate SAN checks of an ingress TLS server (Istio's
//! `tls.subjectAltNames`, Envoy's `match_typed_subject_alt_names`): once the
//! chain verified against the client CA, one of the end-entity
//! certificate's subject alternative names must match.

use std::{net::IpAddr, sync::Arc};

use mesh_api::envoy::envoy::extensions::transport_sockets::tls::v3::{
    SubjectAltNameMatcher, subject_alt_name_matcher::SanType,
};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, Error, SignatureScheme,
    client::danger::HandshakeSignatureValid,
    pki_types::{CertificateDer, UnixTime},
    server::danger::{ClientCertVerified, ClientCertVerifier},
};
use x509_parser::{certificate::X509Certificate, extensions::GeneralName, prelude::FromDer};

use crate::route::StrMatch;

/// One accepted name: a SAN type and a matcher for its value.
#[derive(Debug)]
struct SanMatch {
    kind: SanType,
    pattern: StrMatch,
}

/// A client verifier that adds the SAN check to `inner`'s chain check.
#[derive(Debug)]
pub struct SanVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    names: Vec<SanMatch>,
}

impl SanVerifier {
    /// Wraps `inner` so a client certificate also needs a SAN matching one
    /// of `matchers`; `at` names the field in errors.
    pub fn new(
        inner: Arc<dyn ClientCertVerifier>,
        matchers: &[SubjectAltNameMatcher],
        at: &str,
    ) -> Result<Self, String> {
        let names = matchers
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let at = format!("{at}.match_typed_subject_alt_names[{i}]");
                let kind = match SanType::try_from(m.san_type) {
                    Ok(
                        kind @ (SanType::Dns | SanType::Uri | SanType::Email | SanType::IpAddress),
                    ) => kind,
                    _ => {
                        return Err(format!(
                            "{at}.san_type: only DNS, URI, EMAIL and IP_ADDRESS are supported"
                        ));
                    }
                };
                let pattern = m
                    .matcher
                    .as_ref()
                    .ok_or_else(|| format!("{at}.matcher: required"))
                    .and_then(|s| StrMatch::compile(s).map_err(|e| format!("{at}.matcher: {e}")))?;
                Ok(SanMatch { kind, pattern })
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(Self { inner, names })
    }

    /// Whether a SAN of the DER certificate matches one of the names.
    fn accepts(&self, der: &[u8]) -> bool {
        let Ok((_, cert)) = X509Certificate::from_der(der) else {
            return false;
        };
        let Ok(Some(san)) = cert.subject_alternative_name() else {
            return false;
        };
        san.value.general_names.iter().any(|name| {
            let (kind, value) = match name {
                GeneralName::DNSName(v) => (SanType::Dns, (*v).to_owned()),
                GeneralName::URI(v) => (SanType::Uri, (*v).to_owned()),
                GeneralName::RFC822Name(v) => (SanType::Email, (*v).to_owned()),
                GeneralName::IPAddress(bytes) => match ip(bytes) {
                    Some(ip) => (SanType::IpAddress, ip.to_string()),
                    None => return false,
                },
                _ => return false,
            };
            self.names
                .iter()
                .any(|n| n.kind == kind && n.pattern.matches(&value))
        })
    }
}

fn ip(bytes: &[u8]) -> Option<IpAddr> {
    match bytes.len() {
        4 => Some(IpAddr::from(<[u8; 4]>::try_from(bytes).ok()?)),
        16 => Some(IpAddr::from(<[u8; 16]>::try_from(bytes).ok()?)),
        _ => None,
    }
}

impl ClientCertVerifier for SanVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        if self.accepts(end_entity) {
            Ok(verified)
        } else {
            Err(Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_api::envoy::envoy::r#type::matcher::v3::{
        StringMatcher, string_matcher::MatchPattern,
    };

    fn exact(kind: SanType, value: &str) -> SubjectAltNameMatcher {
        SubjectAltNameMatcher {
            san_type: kind as i32,
            matcher: Some(StringMatcher {
                match_pattern: Some(MatchPattern::Exact(value.into())),
                ignore_case: false,
            }),
            ..Default::default()
        }
    }

    fn cert(names: &[&str]) -> Vec<u8> {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.subject_alt_names.push(rcgen::SanType::URI(
            "spiffe://cluster.local/ns/a/sa/b".try_into().unwrap(),
        ));
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn a_san_of_the_right_type_and_value_is_accepted() {
        let inner = rustls::server::WebPkiClientVerifier::no_client_auth();
        let verifier = SanVerifier::new(
            inner.clone(),
            &[
                exact(SanType::Dns, "client.example.com"),
                exact(SanType::Uri, "spiffe://cluster.local/ns/a/sa/b"),
            ],
            "chain",
        )
        .unwrap();
        assert!(verifier.accepts(&cert(&["client.example.com"])));
        assert!(verifier.accepts(&cert(&["intruder.example.com"])), "by URI");
        let dns_only = SanVerifier::new(
            inner.clone(),
            &[exact(SanType::Dns, "client.example.com")],
            "c",
        )
        .unwrap();
        assert!(!dns_only.accepts(&cert(&["intruder.example.com"])));
        // A DNS matcher never matches a URI SAN with the same text.
        let wrong_type = SanVerifier::new(
            inner.clone(),
            &[exact(SanType::Dns, "spiffe://cluster.local/ns/a/sa/b")],
            "c",
        )
        .unwrap();
        assert!(!wrong_type.accepts(&cert(&["intruder.example.com"])));
        assert!(!dns_only.accepts(b"not a certificate"));

        let err = SanVerifier::new(inner, &[exact(SanType::OtherName, "x")], "chain").unwrap_err();
        assert!(
            err.contains("chain.match_typed_subject_alt_names[0].san_type"),
            "{err}"
        );
    }
}
