//! `istio.v1.auth.IstioCertificateService`: the CA over gRPC.

use std::sync::Arc;

use arc_swap::ArcSwap;
use mesh_api::ca::{
    IstioCertificateRequest, IstioCertificateResponse,
    istio_certificate_service_server::IstioCertificateService,
};
use mesh_hbone::{Identity, identity::IdentityError};
use tonic::{Request, Response, Status};

use crate::{
    auth::{Authenticator, Caller},
    ca::{CertificateAuthority, requested_identities},
    metrics::Metrics,
    model::Model,
};

/// Signs certificates for identities the caller's node runs.
pub struct CaService {
    ca: Arc<CertificateAuthority>,
    auth: Arc<Authenticator>,
    model: Arc<ArcSwap<Model>>,
    trust_domain: String,
    metrics: Arc<Metrics>,
}

impl CaService {
    /// A service signing with `ca` for callers `auth` knows.
    pub fn new(
        ca: Arc<CertificateAuthority>,
        auth: Arc<Authenticator>,
        model: Arc<ArcSwap<Model>>,
        trust_domain: String,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            ca,
            auth,
            model,
            trust_domain,
            metrics,
        }
    }

    fn authorize(
        &self,
        caller: &Caller,
        request: &IstioCertificateRequest,
    ) -> Result<Identity, Status> {
        let node = caller.node.as_str();
        let requested = requested_identities(&request.csr)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let [uri] = requested.as_slice() else {
            return Err(Status::invalid_argument(format!(
                "the CSR must carry exactly one URI SAN, it carries {}",
                requested.len()
            )));
        };
        let identity: Identity = uri
            .parse()
            .map_err(|e: IdentityError| Status::invalid_argument(e.to_string()))?;
        if identity.trust_domain != self.trust_domain {
            return Err(Status::permission_denied(format!(
                "{identity} is not in trust domain {}",
                self.trust_domain
            )));
        }
        if let Some((namespace, account)) = &caller.only_identity
            && (identity.namespace != *namespace || identity.service_account != *account)
        {
            return Err(Status::permission_denied(format!(
                "a waypoint authenticated as {namespace}/{account} may get only its own certificate, not {identity}"
            )));
        }
        if !self.model.load().node_runs_identity(
            node,
            &identity.namespace,
            &identity.service_account,
        ) {
            return Err(Status::permission_denied(format!(
                "no pod on node {node} runs as {identity}"
            )));
        }
        Ok(identity)
    }
}

#[tonic::async_trait]
impl IstioCertificateService for CaService {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let caller = self.auth.authenticate(request.metadata()).await?;
        let request = request.into_inner();
        let outcome = self.authorize(&caller, &request).and_then(|identity| {
            let ttl = CertificateAuthority::ttl_for(request.validity_duration)
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
            let chain = self
                .ca
                .sign(&request.csr, &identity, ttl)
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
            Ok((identity, chain))
        });
        match outcome {
            Ok((identity, cert_chain)) => {
                tracing::info!(node = %caller.node, %identity, "signed workload certificate");
                self.metrics.csr_signed.inc();
                Ok(Response::new(IstioCertificateResponse { cert_chain }))
            }
            Err(status) => {
                tracing::warn!(node = %caller.node, error = %status.message(), "refused certificate request");
                self.metrics.csr_refused.inc();
                Err(status)
            }
        }
    }
}
