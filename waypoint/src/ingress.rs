//! Ingress listeners: a port of an ingress gateway, plain HTTP or TLS
//! terminated with the certificate of the filter chain the client's SNI
//! selects (Envoy's `server_names` match: exact, then the longest
//! `*.suffix`, then the chain without names), checking client
//! certificates against the chain's trusted CA when it has one (mutual TLS).

use std::sync::Arc;

use mesh_api::envoy::envoy::{
    config::{
        core::v3::{DataSource, data_source},
        listener::v3::FilterChain,
    },
    extensions::transport_sockets::tls::v3::{
        CommonTlsContext, DownstreamTlsContext, common_tls_context::ValidationContextType,
    },
};
use prost::Message;
use rustls::{
    RootCertStore, ServerConfig,
    server::{WebPkiClientVerifier, danger::ClientCertVerifier},
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};

use crate::config::Chain;

const TLS_TRANSPORT_SOCKET: &str = "envoy.transport_sockets.tls";

/// One ingress port's filter chains.
#[derive(Debug)]
pub struct IngressListener {
    /// The chains; TLS ones are chosen by SNI.
    pub chains: Vec<IngressChain>,
}

/// A filter chain of an ingress port.
#[derive(Debug)]
pub struct IngressChain {
    /// SNI names it serves (lowercase; `*.suffix` allowed); empty: any.
    pub server_names: Vec<String>,
    /// Its TLS termination; none for plain HTTP or TCP, and for TLS passed
    /// through unterminated (a TCP chain with `server_names`).
    pub tls: Option<Arc<ServerConfig>>,
    /// What its connections get.
    pub chain: Chain,
}

impl IngressListener {
    /// Whether connections start with a TLS ClientHello whose SNI picks the
    /// chain (chains that terminate TLS, or pass it through by name).
    pub fn routes_by_sni(&self) -> bool {
        self.chains
            .iter()
            .any(|c| c.tls.is_some() || !c.server_names.is_empty())
    }

    /// The chain for a client that sent `sni`.
    pub fn for_sni(&self, sni: Option<&str>) -> Option<&IngressChain> {
        let sni = sni.map(str::to_ascii_lowercase);
        if let Some(sni) = &sni {
            if let Some(exact) = self
                .chains
                .iter()
                .find(|c| c.server_names.iter().any(|n| n == sni))
            {
                return Some(exact);
            }
            let suffix = self
                .chains
                .iter()
                .filter_map(|c| {
                    let longest = c
                        .server_names
                        .iter()
                        .filter_map(|n| n.strip_prefix('*'))
                        .filter(|suffix| sni.len() > suffix.len() && sni.ends_with(suffix))
                        .map(str::len)
                        .max()?;
                    Some((longest, c))
                })
                .max_by_key(|(len, _)| *len);
            if let Some((_, chain)) = suffix {
                return Some(chain);
            }
        }
        self.chains.iter().find(|c| c.server_names.is_empty())
    }
}

/// Reads one ingress filter chain's SNI match and TLS context.
pub fn compile_chain_tls(
    chain: &FilterChain,
    at: &str,
) -> Result<(Vec<String>, Option<Arc<ServerConfig>>), String> {
    let server_names: Vec<String> = chain
        .filter_chain_match
        .as_ref()
        .map(|m| {
            m.server_names
                .iter()
                .map(|n| n.to_ascii_lowercase())
                .collect()
        })
        .unwrap_or_default();
    let Some(socket) = &chain.transport_socket else {
        // Server names without a transport socket: TLS passed through.
        return Ok((server_names, None));
    };
    if socket.name != TLS_TRANSPORT_SOCKET {
        return Err(format!(
            "{at}.transport_socket: {} is not supported",
            socket.name
        ));
    }
    let Some(mesh_api::envoy::envoy::config::core::v3::transport_socket::ConfigType::TypedConfig(
        any,
    )) = &socket.config_type
    else {
        return Err(format!("{at}.transport_socket: no typed_config"));
    };
    let context = DownstreamTlsContext::decode(any.value.as_slice())
        .map_err(|e| format!("{at}.transport_socket: {e}"))?;
    let require_client = context
        .require_client_certificate
        .as_ref()
        .is_some_and(|b| b.value);
    let common = context.common_tls_context.unwrap_or_default();
    let client_verifier = client_verifier(&common, require_client, at)?;
    let [certificate] = common.tls_certificates.as_slice() else {
        return Err(format!(
            "{at}: exactly one tls_certificates entry is supported"
        ));
    };
    let chain_pem = data(
        certificate.certificate_chain.as_ref(),
        &format!("{at}.certificate_chain"),
    )?;
    let key_pem = data(
        certificate.private_key.as_ref(),
        &format!("{at}.private_key"),
    )?;
    let certs = CertificateDer::pem_slice_iter(&chain_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{at}.certificate_chain: bad PEM: {e}"))?;
    if certs.is_empty() {
        return Err(format!("{at}.certificate_chain: no certificate"));
    }
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| format!("{at}.private_key: bad PEM: {e}"))?;
    let mut config = ServerConfig::builder_with_provider(mesh_hbone::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("{at}: {e}"))?
        .with_client_cert_verifier(client_verifier)
        .with_single_cert(certs, key)
        .map_err(|e| format!("{at}: certificate and key: {e}"))?;
    config.alpn_protocols = common
        .alpn_protocols
        .iter()
        .map(|p| p.as_bytes().to_vec())
        .collect();
    Ok((server_names, Some(Arc::new(config))))
}

/// How a chain checks client certificates (Istio's `MUTUAL` and
/// `OPTIONAL_MUTUAL`): against the validation context's `trusted_ca`,
/// required when `require` is set, else checked only when presented. No
/// validation context: no client certificate is asked for.
fn client_verifier(
    common: &CommonTlsContext,
    require: bool,
    at: &str,
) -> Result<Arc<dyn ClientCertVerifier>, String> {
    let validation = match &common.validation_context_type {
        None if require => {
            return Err(format!(
                "{at}.require_client_certificate: needs a validation_context with trusted_ca"
            ));
        }
        None => return Ok(WebPkiClientVerifier::no_client_auth()),
        Some(ValidationContextType::ValidationContext(validation)) => validation,
        Some(_) => {
            return Err(format!(
                "{at}.validation_context: only an inline validation_context is supported"
            ));
        }
    };
    let unsupported = [
        #[allow(deprecated)]
        (
            "match_subject_alt_names",
            !validation.match_subject_alt_names.is_empty(),
        ),
        (
            "verify_certificate_spki",
            !validation.verify_certificate_spki.is_empty(),
        ),
        (
            "verify_certificate_hash",
            !validation.verify_certificate_hash.is_empty(),
        ),
        ("crl", validation.crl.is_some()),
    ];
    if let Some((field, _)) = unsupported.iter().find(|(_, set)| *set) {
        return Err(format!(
            "{at}.validation_context.{field}: not supported (a client check that cannot be made is refused, not skipped)"
        ));
    }
    let ca_pem = data(
        validation.trusted_ca.as_ref(),
        &format!("{at}.validation_context.trusted_ca"),
    )?;
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&ca_pem) {
        let cert = cert.map_err(|e| format!("{at}.validation_context.trusted_ca: bad PEM: {e}"))?;
        roots
            .add(cert)
            .map_err(|e| format!("{at}.validation_context.trusted_ca: {e}"))?;
    }
    if roots.is_empty() {
        return Err(format!(
            "{at}.validation_context.trusted_ca: no certificate"
        ));
    }
    let builder =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), mesh_hbone::tls::provider());
    let builder = if require {
        builder
    } else {
        builder.allow_unauthenticated()
    };
    let chain = builder
        .build()
        .map_err(|e| format!("{at}.validation_context: {e}"))?;
    if validation.match_typed_subject_alt_names.is_empty() {
        return Ok(chain);
    }
    Ok(Arc::new(crate::client_san::SanVerifier::new(
        chain,
        &validation.match_typed_subject_alt_names,
        &format!("{at}.validation_context"),
    )?))
}

/// The bytes of a data source: inline, or a file on the gateway.
fn data(source: Option<&DataSource>, at: &str) -> Result<Vec<u8>, String> {
    match source.and_then(|s| s.specifier.as_ref()) {
        Some(data_source::Specifier::InlineBytes(b)) => Ok(b.clone()),
        Some(data_source::Specifier::InlineString(s)) => Ok(s.as_bytes().to_vec()),
        Some(data_source::Specifier::Filename(path)) => {
            read_pem_file(path).map_err(|e| format!("{at}: reading {path}: {e}"))
        }
        _ => Err(format!("{at}: inline bytes or a file name is required")),
    }
}

/// Certificates and keys are small: read at most this much of a file.
const MAX_PEM_FILE: u64 = 1 << 20;

/// Reads a regular file of at most [`MAX_PEM_FILE`] bytes (never a device
/// or a pipe, which could block or never end).
fn read_pem_file(path: &str) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let file = std::fs::File::open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    if meta.len() > MAX_PEM_FILE {
        return Err(std::io::Error::other(format!(
            "larger than {MAX_PEM_FILE} bytes"
        )));
    }
    let mut bytes = Vec::new();
    file.take(MAX_PEM_FILE).read_to_end(&mut bytes)?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(names: &[&str]) -> IngressChain {
        IngressChain {
            server_names: names.iter().map(|n| (*n).to_owned()).collect(),
            tls: None,
            chain: Chain::Tcp {
                name: names.join(","),
                clusters: Vec::new(),
                authz: Default::default(),
            },
        }
    }

    #[test]
    fn sni_picks_exact_then_longest_suffix_then_the_default() {
        let listener = IngressListener {
            chains: vec![
                chain(&["*.example.com"]),
                chain(&["api.example.com"]),
                chain(&["*.eu.example.com"]),
                chain(&[]),
            ],
        };
        let pick = |sni: Option<&str>| listener.for_sni(sni).map(|c| c.server_names.join(","));
        assert_eq!(pick(Some("API.example.com")).unwrap(), "api.example.com");
        assert_eq!(
            pick(Some("shop.eu.example.com")).unwrap(),
            "*.eu.example.com"
        );
        assert_eq!(pick(Some("www.example.com")).unwrap(), "*.example.com");
        assert_eq!(pick(Some("other.org")).unwrap(), "");
        assert_eq!(pick(None).unwrap(), "");
    }
}
