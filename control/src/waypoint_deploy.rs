//! Waypoint and ingress Deployments: for every Gateway API `Gateway` of
//! class `istio-waypoint`, the control plane (Kubernetes source mode)
//! applies a ServiceAccount, a Deployment and a Service named after the
//! Gateway in the Gateway's namespace, owned by the Gateway (deleting the
//! Gateway lets the garbage collector delete them), and reports the
//! Service's address in the Gateway's `status`. For a Gateway of class
//! `istio` (ingress, [`crate::kube_gateway`]) it does the same with the
//! objects named `<gateway>-istio`, as Istio names them: the pod also
//! listens on every listener's port (unprivileged ports start at 0 in its
//! network namespace, so it binds 80 without root), and the Service is a
//! `LoadBalancer` exposing those ports; the status reports the load
//! balancer's address once it has one.
//!
//! - [`render`] is pure: Gateway + [`WaypointTemplate`] (the chart's
//!   waypoint values, passed as `mesh-control` flags) → typed objects.
//! - [`run`] is a kube-rs `Controller`: it watches the Gateways and the
//!   objects it applied (Deployments, Services, ServiceAccounts labelled
//!   [`MANAGED_BY_LABEL`]`=`[`FIELD_MANAGER`], mapped to their Gateway by
//!   owner reference) and server-side applies the rendered objects with
//!   field manager [`FIELD_MANAGER`] (forced: the control plane owns these
//!   objects) on every event, debounced by [`DEBOUNCE`]. So a waypoint
//!   object deleted or edited by hand is put back within a second; a failed
//!   apply is retried after [`RETRY`], and every waypoint is re-applied
//!   every [`RESYNC`] in case a watch missed an event. An apply that
//!   changes nothing writes nothing, so the controller's own writes settle.
//! - The waypoint pod is labelled `istio.io/dataplane-mode=none` (a
//!   waypoint is never captured) and authenticates to the control plane
//!   with a projected token of its own service account (audience
//!   [`WaypointTemplate::token_audience`]); TokenReview accepts it as a
//!   waypoint, which may get a certificate for its own identity only
//!   ([`crate::auth::Caller::only_identity`]).

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use futures::StreamExt as _;
use k8s_openapi::{
    api::{
        apps::v1::{Deployment, DeploymentSpec},
        core::v1::{
            Capabilities, ConfigMapVolumeSource, Container, ContainerPort, EnvVar, EnvVarSource,
            HTTPGetAction, ObjectFieldSelector, PodSecurityContext, PodSpec, PodTemplateSpec,
            Probe, ProjectedVolumeSource, ResourceRequirements, SecurityContext, Service,
            ServiceAccount, ServiceAccountTokenProjection, ServicePort, ServiceSpec, Sysctl,
            Volume, VolumeMount, VolumeProjection,
        },
    },
    apimachinery::pkg::{
        api::resource::Quantity,
        apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference},
        util::intstr::IntOrString,
    },
};
use kube::{
    Api, Client, ResourceExt as _,
    api::{ApiResource, DynamicObject, Patch, PatchParams},
    runtime::{
        Controller,
        controller::{self, Action},
        watcher,
    },
};
use serde_json::{Value, json};

use crate::root_cert;

/// `gatewayClassName` of waypoints.
pub const WAYPOINT_CLASS: &str = "istio-waypoint";
/// Label naming the Gateway a waypoint pod serves (selector of its Service).
pub const GATEWAY_NAME_LABEL: &str = "gateway.networking.k8s.io/gateway-name";
/// Istio's enrolment label; `none` keeps the waypoint out of capture.
pub const DATAPLANE_MODE_LABEL: &str = "istio.io/dataplane-mode";
/// Field manager of every apply.
pub const FIELD_MANAGER: &str = "mesh-control";
/// HBONE port of a waypoint.
pub const HBONE_PORT: i32 = 15008;
/// Prometheus metrics port of a waypoint.
pub const METRICS_PORT: i32 = 15020;
/// Readiness port of a waypoint (`/healthz/ready`).
pub const READINESS_PORT: i32 = 15021;
/// Where the waypoint's projected token is mounted.
pub const TOKEN_DIR: &str = "/var/run/secrets/tokens";
/// How long after a failed apply it is tried again.
pub const RETRY: Duration = Duration::from_secs(5);
/// Events of one Gateway and its objects within this window make one
/// reconcile (a Deployment's rollout changes its status several times).
pub const DEBOUNCE: Duration = Duration::from_millis(500);
/// A waypoint is applied again this long after its last apply even if no
/// event came, in case a watch missed one.
pub const RESYNC: Duration = Duration::from_secs(600);
/// Label on every object this controller applies; its watches of
/// Deployments, Services and ServiceAccounts select on it.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";

/// What the waypoint controller needs from RBAC: (apiGroup, resource,
/// verbs). `list`/`watch` on gateways is already [`crate::source::kubernetes::WATCHED`]'s.
pub const API_ACCESS: &[(&str, &str, &[&str])] = &[
    (
        "apps",
        "deployments",
        &["get", "list", "watch", "create", "patch", "delete"],
    ),
    (
        "",
        "services",
        &["get", "list", "watch", "create", "patch", "delete"],
    ),
    (
        "",
        "serviceaccounts",
        &["get", "list", "watch", "create", "patch", "delete"],
    ),
    ("gateway.networking.k8s.io", "gateways", &["list", "watch"]),
    ("gateway.networking.k8s.io", "gateways/status", &["patch"]),
];

/// How waypoint pods are run: the chart's `waypoint` values.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WaypointTemplate {
    /// Container image of the waypoint.
    pub image: String,
    /// `imagePullPolicy`.
    pub image_pull_policy: String,
    /// CPU request, e.g. `100m`.
    pub cpu_request: String,
    /// Memory request, e.g. `128Mi`.
    pub memory_request: String,
    /// Memory limit, e.g. `512Mi`.
    pub memory_limit: String,
    /// The control plane's xDS and CA address, e.g.
    /// `http://mesh-control.istio-system.svc:15010`.
    pub xds_address: String,
    /// Audience of the waypoint's projected service-account token.
    pub token_audience: String,
    /// SPIFFE trust domain.
    pub trust_domain: String,
    /// `RUST_LOG` of the waypoint.
    pub log_level: String,
    /// The mesh root (PEM), when the waypoint dials the control plane over
    /// TLS: published as [`root_cert::CONFIG_MAP`] in the Gateway's
    /// namespace and mounted for `--xds-root-cert`.
    pub root_cert: Option<String>,
}

/// The Gateway a waypoint is deployed for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GatewayRef {
    /// `apiVersion` of the Gateway, e.g. `gateway.networking.k8s.io/v1`.
    pub api_version: String,
    /// Namespace (also the waypoint's).
    pub namespace: String,
    /// Name of the Gateway.
    pub name: String,
    /// `metadata.uid`, for the owner reference.
    pub uid: String,
    /// What the Gateway is deployed as.
    pub role: GatewayRole,
}

/// What a Gateway's proxy is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GatewayRole {
    /// A waypoint (class [`WAYPOINT_CLASS`]): HBONE on [`HBONE_PORT`].
    Waypoint,
    /// An ingress gateway (class [`crate::kube_gateway::INGRESS_CLASS`]):
    /// its listeners' ports, `(listener name, port)`, one entry per port.
    Ingress(Vec<(String, i32)>),
}

impl GatewayRef {
    /// The Gateway `object` if it is a waypoint or an ingress Gateway with
    /// a namespace, name and uid.
    pub fn of(api_version: &str, object: &DynamicObject) -> Option<Self> {
        let class = object.data.pointer("/spec/gatewayClassName")?.as_str()?;
        let role = if class == WAYPOINT_CLASS {
            GatewayRole::Waypoint
        } else if class == crate::kube_gateway::INGRESS_CLASS {
            let mut ports: Vec<(String, i32)> = Vec::new();
            let listeners = object
                .data
                .pointer("/spec/listeners")
                .and_then(Value::as_array);
            for listener in listeners.into_iter().flatten() {
                let port = listener["port"]
                    .as_i64()
                    .and_then(|p| i32::try_from(p).ok());
                let name = listener["name"].as_str().unwrap_or_default();
                if let Some(port) = port.filter(|p| !ports.iter().any(|(_, q)| q == p)) {
                    ports.push((name.to_owned(), port));
                }
            }
            GatewayRole::Ingress(ports)
        } else {
            return None;
        };
        Some(Self {
            api_version: api_version.to_owned(),
            namespace: object.namespace()?,
            name: object.metadata.name.clone()?,
            uid: object.metadata.uid.clone()?,
            role,
        })
    }

    /// The name of the Deployment, Service and ServiceAccount applied for
    /// it: the Gateway's for a waypoint, `<gateway>-istio` for an ingress.
    pub fn object_name(&self) -> String {
        match self.role {
            GatewayRole::Waypoint => self.name.clone(),
            GatewayRole::Ingress(_) => crate::kube_gateway::deployment_name(&self.name),
        }
    }
}

/// What is applied for one waypoint.
#[derive(Clone, Debug, PartialEq)]
pub struct WaypointObjects {
    /// The waypoint's identity.
    pub service_account: ServiceAccount,
    /// The waypoint's pods.
    pub deployment: Deployment,
    /// How clients (ztunnel) reach it.
    pub service: Service,
}

/// The objects of `gateway`'s waypoint: pure, typed.
pub fn render(gateway: &GatewayRef, template: &WaypointTemplate) -> WaypointObjects {
    let name = gateway.object_name();
    let listener_ports: &[(String, i32)] = match &gateway.role {
        GatewayRole::Waypoint => &[],
        GatewayRole::Ingress(ports) => ports,
    };
    let selector = BTreeMap::from([(GATEWAY_NAME_LABEL.to_owned(), gateway.name.clone())]);
    let mut labels = selector.clone();
    labels.insert(MANAGED_BY_LABEL.to_owned(), FIELD_MANAGER.to_owned());
    let meta = ObjectMeta {
        name: Some(name.clone()),
        namespace: Some(gateway.namespace.clone()),
        labels: Some(labels.clone()),
        owner_references: Some(vec![OwnerReference {
            api_version: gateway.api_version.clone(),
            kind: "Gateway".to_owned(),
            name: gateway.name.clone(),
            uid: gateway.uid.clone(),
            controller: Some(true),
            block_owner_deletion: None,
        }]),
        ..ObjectMeta::default()
    };
    let mut pod_labels = labels;
    pod_labels.insert(DATAPLANE_MODE_LABEL.to_owned(), "none".to_owned());

    let field = |path: &str| EnvVarSource {
        field_ref: Some(ObjectFieldSelector {
            field_path: path.to_owned(),
            ..ObjectFieldSelector::default()
        }),
        ..EnvVarSource::default()
    };
    let env = vec![
        EnvVar {
            name: "POD_NAMESPACE".into(),
            value_from: Some(field("metadata.namespace")),
            ..EnvVar::default()
        },
        EnvVar {
            name: "GATEWAY_NAME".into(),
            value: Some(gateway.name.clone()),
            ..EnvVar::default()
        },
        EnvVar {
            name: "SERVICE_ACCOUNT".into(),
            value_from: Some(field("spec.serviceAccountName")),
            ..EnvVar::default()
        },
        EnvVar {
            name: "INSTANCE_IP".into(),
            value_from: Some(field("status.podIP")),
            ..EnvVar::default()
        },
        EnvVar {
            name: "RUST_LOG".into(),
            value: Some(template.log_level.clone()),
            ..EnvVar::default()
        },
    ];
    let port = |name: &str, port: i32| ContainerPort {
        name: Some(name.to_owned()),
        container_port: port,
        protocol: Some("TCP".into()),
        ..ContainerPort::default()
    };
    let quantity = |q: &str| Quantity(q.to_owned());
    let mut container = Container {
        name: "waypoint".into(),
        image: Some(template.image.clone()),
        image_pull_policy: Some(template.image_pull_policy.clone()),
        args: Some(vec![
            format!("--xds-address={}", template.xds_address),
            format!("--xds-token-file={TOKEN_DIR}/mesh-token"),
            format!("--trust-domain={}", template.trust_domain),
            format!("--hbone-addr=0.0.0.0:{HBONE_PORT}"),
            format!("--metrics-addr=0.0.0.0:{METRICS_PORT}"),
            format!("--readiness-addr=0.0.0.0:{READINESS_PORT}"),
            "--admin-addr=127.0.0.1:15000".into(),
        ]),
        env: Some(env),
        ports: Some(
            [
                port("tcp-hbone", HBONE_PORT),
                port("http-monitoring", METRICS_PORT),
                port("status-port", READINESS_PORT),
            ]
            .into_iter()
            .chain(listener_ports.iter().map(|(_, p)| ContainerPort {
                container_port: *p,
                protocol: Some("TCP".into()),
                ..ContainerPort::default()
            }))
            .collect(),
        ),
        readiness_probe: Some(Probe {
            http_get: Some(HTTPGetAction {
                path: Some("/healthz/ready".into()),
                port: IntOrString::Int(READINESS_PORT),
                ..HTTPGetAction::default()
            }),
            period_seconds: Some(5),
            ..Probe::default()
        }),
        resources: Some(ResourceRequirements {
            requests: Some(BTreeMap::from([
                ("cpu".to_owned(), quantity(&template.cpu_request)),
                ("memory".to_owned(), quantity(&template.memory_request)),
            ])),
            limits: Some(BTreeMap::from([(
                "memory".to_owned(),
                quantity(&template.memory_limit),
            )])),
            ..ResourceRequirements::default()
        }),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Capabilities::default()
            }),
            ..SecurityContext::default()
        }),
        volume_mounts: Some(vec![VolumeMount {
            name: "mesh-token".into(),
            mount_path: TOKEN_DIR.into(),
            read_only: Some(true),
            ..VolumeMount::default()
        }]),
        ..Container::default()
    };
    let mut volumes = Vec::new();
    if template.root_cert.is_some() {
        if let Some(args) = container.args.as_mut() {
            args.push(format!(
                "--xds-root-cert={}/{}",
                root_cert::MOUNT_DIR,
                root_cert::KEY
            ));
        }
        if let Some(mounts) = container.volume_mounts.as_mut() {
            mounts.push(VolumeMount {
                name: "mesh-root".into(),
                mount_path: root_cert::MOUNT_DIR.into(),
                read_only: Some(true),
                ..VolumeMount::default()
            });
        }
        volumes.push(Volume {
            name: "mesh-root".into(),
            config_map: Some(ConfigMapVolumeSource {
                name: root_cert::CONFIG_MAP.into(),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        });
    }
    let token = Volume {
        name: "mesh-token".into(),
        projected: Some(ProjectedVolumeSource {
            sources: Some(vec![VolumeProjection {
                service_account_token: Some(ServiceAccountTokenProjection {
                    path: "mesh-token".into(),
                    audience: Some(template.token_audience.clone()),
                    expiration_seconds: Some(43_200),
                    ..ServiceAccountTokenProjection::default()
                }),
                ..VolumeProjection::default()
            }]),
            ..ProjectedVolumeSource::default()
        }),
        ..Volume::default()
    };
    let deployment = Deployment {
        metadata: meta.clone(),
        spec: DeploymentSpec {
            replicas: Some(1),
            selector: LabelSelector {
                match_labels: Some(selector.clone()),
                ..LabelSelector::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    service_account_name: Some(name.clone()),
                    // Open HBONE tunnels get this long to finish.
                    termination_grace_period_seconds: Some(30),
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        run_as_user: Some(1337),
                        run_as_group: Some(1337),
                        // An ingress binds its listeners' ports (80, 443)
                        // as uid 1337, as Istio's gateways do.
                        sysctls: (!listener_ports.is_empty()).then(|| {
                            vec![Sysctl {
                                name: "net.ipv4.ip_unprivileged_port_start".into(),
                                value: "0".into(),
                            }]
                        }),
                        ..PodSecurityContext::default()
                    }),
                    containers: vec![container],
                    volumes: Some(std::iter::once(token).chain(volumes).collect()),
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        },
        ..Deployment::default()
    };
    let service_port = |name: &str, port: i32| ServicePort {
        name: Some(name.to_owned()),
        port,
        target_port: Some(IntOrString::Int(port)),
        protocol: Some("TCP".into()),
        ..ServicePort::default()
    };
    let service = Service {
        metadata: meta.clone(),
        spec: Some(match &gateway.role {
            GatewayRole::Waypoint => ServiceSpec {
                selector: Some(selector),
                ports: Some(vec![
                    service_port("mesh", HBONE_PORT),
                    service_port("status-port", READINESS_PORT),
                ]),
                ..ServiceSpec::default()
            },
            GatewayRole::Ingress(ports) => ServiceSpec {
                selector: Some(selector),
                type_: Some("LoadBalancer".into()),
                ports: Some(
                    std::iter::once(service_port("status-port", READINESS_PORT))
                        .chain(ports.iter().map(|(name, port)| service_port(name, *port)))
                        .collect(),
                ),
                ..ServiceSpec::default()
            },
        }),
        ..Service::default()
    };
    WaypointObjects {
        service_account: ServiceAccount {
            metadata: meta,
            ..ServiceAccount::default()
        },
        deployment,
        service,
    }
}

/// The `status` of a waypoint Gateway whose Service has `cluster_ip`
/// (`None` until the API server assigned one), keeping the
/// `lastTransitionTime` of conditions whose status did not change.
pub fn gateway_status(
    generation: Option<i64>,
    cluster_ip: Option<&str>,
    previous: Option<&Value>,
    now: &str,
) -> Value {
    let previous_condition = |kind: &str| {
        previous
            .and_then(|s| s.get("conditions"))
            .and_then(Value::as_array)
            .and_then(|list| list.iter().find(|c| c["type"] == kind))
    };
    let condition = |kind: &str, ok: bool, reason: &str, message: &str| {
        let status = if ok { "True" } else { "False" };
        let since = previous_condition(kind)
            .filter(|c| c["status"] == status)
            .and_then(|c| c["lastTransitionTime"].as_str())
            .unwrap_or(now)
            .to_owned();
        json!({
            "type": kind,
            "status": status,
            "reason": reason,
            "message": message,
            "observedGeneration": generation.unwrap_or(0),
            "lastTransitionTime": since,
        })
    };
    let programmed = match cluster_ip {
        Some(_) => condition(
            "Programmed",
            true,
            "Programmed",
            "the waypoint's Deployment and Service are applied",
        ),
        None => condition(
            "Programmed",
            false,
            "AddressNotAssigned",
            "the waypoint's Service has no cluster IP yet",
        ),
    };
    let addresses: Vec<Value> = cluster_ip
        .into_iter()
        .map(|ip| json!({"type": "IPAddress", "value": ip}))
        .collect();
    json!({
        "addresses": addresses,
        "conditions": [
            condition("Accepted", true, "Accepted", "deployed by mesh-control"),
            programmed,
        ],
    })
}

/// Why applying a waypoint failed (the controller retries after [`RETRY`]).
#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    /// The API server refused the apply of one of the waypoint's objects,
    /// or of its Gateway's status.
    #[error("applying {kind} {namespace}/{name}: {source}")]
    Apply {
        /// `ServiceAccount`, `Deployment`, `Service` or `Gateway status`.
        kind: &'static str,
        /// Namespace of the Gateway.
        namespace: String,
        /// Name of the Gateway (and of its objects).
        name: String,
        /// What the API server said.
        #[source]
        source: Box<kube::Error>,
    },
    /// The mesh root could not be published in the waypoint's namespace.
    #[error(transparent)]
    RootCert(#[from] root_cert::PublishError),
    /// The clock could not be read for a condition's transition time.
    #[error("rounding the current time for Gateway {namespace}/{name}'s status: {source}")]
    Clock {
        /// Namespace of the Gateway.
        namespace: String,
        /// Name of the Gateway.
        name: String,
        /// Why rounding failed.
        #[source]
        source: k8s_openapi::jiff::Error,
    },
}

/// Watches Gateways (`gateway.networking.k8s.io/<gateway_api_version>`) and
/// the objects this controller applied (label [`MANAGED_BY_LABEL`]`=`[`FIELD_MANAGER`],
/// mapped to their Gateway by owner reference), and applies each waypoint's
/// objects whenever its Gateway or one of them changes or is deleted,
/// debounced by [`DEBOUNCE`]; runs until the future is dropped.
pub async fn run(client: Client, gateway_api_version: String, template: WaypointTemplate) {
    let resource = gateway_resource(&gateway_api_version);
    let gateways: Api<DynamicObject> = Api::all_with(client.clone(), &resource);
    let owned = watcher::Config::default().labels(&format!("{MANAGED_BY_LABEL}={FIELD_MANAGER}"));
    let context = Arc::new(Context {
        client: client.clone(),
        resource: resource.clone(),
        template,
    });
    Controller::new_with(gateways, watcher::Config::default(), resource)
        .owns(Api::<Deployment>::all(client.clone()), owned.clone())
        .owns(Api::<Service>::all(client.clone()), owned.clone())
        .owns(Api::<ServiceAccount>::all(client), owned)
        .with_config(controller::Config::default().debounce(DEBOUNCE))
        .run(reconcile_gateway, retry_later, context)
        .for_each(|result| async move {
            match result {
                Ok(_) => {}
                Err(controller::Error::ReconcilerFailed(err, gateway)) => tracing::warn!(
                    gateway = %format!("{}/{}", gateway.namespace.unwrap_or_default(), gateway.name),
                    error = %err,
                    retry_after = ?RETRY,
                    "applying the waypoint failed; retrying"
                ),
                Err(err) => tracing::debug!(error = %err, "waypoint controller event"),
            }
        })
        .await;
}

/// The Gateway API kind at `version`.
fn gateway_resource(version: &str) -> ApiResource {
    ApiResource {
        group: "gateway.networking.k8s.io".into(),
        version: version.to_owned(),
        api_version: format!("gateway.networking.k8s.io/{version}"),
        kind: "Gateway".into(),
        plural: "gateways".into(),
    }
}

/// What every reconcile needs.
struct Context {
    client: Client,
    resource: ApiResource,
    template: WaypointTemplate,
}

async fn reconcile_gateway(
    object: Arc<DynamicObject>,
    context: Arc<Context>,
) -> Result<Action, DeployError> {
    let Some(gateway) = GatewayRef::of(&context.resource.api_version, &object) else {
        return Ok(Action::await_change());
    };
    reconcile(
        &context.client,
        &context.resource,
        &gateway,
        &object,
        &context.template,
    )
    .await?;
    Ok(Action::requeue(RESYNC))
}

fn retry_later(_: Arc<DynamicObject>, _: &DeployError, _: Arc<Context>) -> Action {
    Action::requeue(RETRY)
}

/// Applies one waypoint's objects, then its Gateway's status.
async fn reconcile(
    client: &Client,
    resource: &ApiResource,
    gateway: &GatewayRef,
    object: &DynamicObject,
    template: &WaypointTemplate,
) -> Result<(), DeployError> {
    let objects = render(gateway, template);
    let ns = &gateway.namespace;
    let name = &gateway.name;
    let object_name = gateway.object_name();
    let failed = |kind: &'static str| {
        move |source| DeployError::Apply {
            kind,
            namespace: ns.clone(),
            name: name.clone(),
            source: Box::new(source),
        }
    };
    let params = PatchParams::apply(FIELD_MANAGER).force();
    // Shared by every waypoint of the namespace (no owner: the last
    // Gateway's deletion must not take it from the others).
    if let Some(root_pem) = &template.root_cert {
        root_cert::publish(client, ns, root_pem).await?;
    }
    Api::<ServiceAccount>::namespaced(client.clone(), ns)
        .patch(
            &object_name,
            &params,
            &Patch::Apply(&objects.service_account),
        )
        .await
        .map_err(failed("ServiceAccount"))?;
    Api::<Deployment>::namespaced(client.clone(), ns)
        .patch(&object_name, &params, &Patch::Apply(&objects.deployment))
        .await
        .map_err(failed("Deployment"))?;
    let service = Api::<Service>::namespaced(client.clone(), ns)
        .patch(&object_name, &params, &Patch::Apply(&objects.service))
        .await
        .map_err(failed("Service"))?;
    // An ingress is reached at its load balancer's address, a waypoint at
    // its cluster IP.
    let load_balancer = service
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .and_then(|ingress| ingress.first())
        .and_then(|i| i.ip.as_deref().or(i.hostname.as_deref()));
    let cluster_ip = match gateway.role {
        GatewayRole::Waypoint => service.spec.as_ref().and_then(|s| s.cluster_ip.as_deref()),
        GatewayRole::Ingress(_) => load_balancer,
    }
    .filter(|ip| !ip.is_empty() && *ip != "None");
    let previous = object.data.get("status");
    let now = k8s_openapi::jiff::Timestamp::now()
        .round(k8s_openapi::jiff::Unit::Second)
        .map_err(|source| DeployError::Clock {
            namespace: ns.clone(),
            name: name.clone(),
            source,
        })?
        .to_string();
    let status = gateway_status(object.metadata.generation, cluster_ip, previous, &now);
    if previous == Some(&status) {
        return Ok(());
    }
    let patch = json!({
        "apiVersion": resource.api_version,
        "kind": "Gateway",
        "metadata": {"name": name, "namespace": ns},
        "status": status,
    });
    Api::<DynamicObject>::namespaced_with(client.clone(), ns, resource)
        .patch_status(name, &params, &Patch::Apply(&patch))
        .await
        .map_err(failed("Gateway status"))?;
    tracing::info!(gateway = %format!("{ns}/{name}"), cluster_ip, "waypoint applied");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template() -> WaypointTemplate {
        WaypointTemplate {
            image: "ghcr.io/mesh/waypoint:0.1.0".into(),
            image_pull_policy: "IfNotPresent".into(),
            cpu_request: "100m".into(),
            memory_request: "128Mi".into(),
            memory_limit: "512Mi".into(),
            xds_address: "http://mesh-control.istio-system.svc:15010".into(),
            token_audience: "istio-ca".into(),
            trust_domain: "cluster.local".into(),
            log_level: "info".into(),
            root_cert: None,
        }
    }

    fn gateway() -> GatewayRef {
        GatewayRef {
            api_version: "gateway.networking.k8s.io/v1".into(),
            namespace: "shop".into(),
            name: "waypoint".into(),
            uid: "uid-1".into(),
            role: GatewayRole::Waypoint,
        }
    }

    #[test]
    fn over_tls_a_waypoint_mounts_the_published_root() {
        let plain = render(&gateway(), &template());
        let pod = plain.deployment.spec.template.spec.unwrap();
        assert_eq!(pod.volumes.unwrap().len(), 1, "only the token");

        let mut tls = template();
        tls.xds_address = "https://mesh-control.istio-system.svc:15012".into();
        tls.root_cert = Some("PEM".into());
        let pod = render(&gateway(), &tls)
            .deployment
            .spec
            .template
            .spec
            .unwrap();
        let container = &pod.containers[0];
        let args = container.args.as_ref().unwrap();
        assert!(args.contains(&"--xds-address=https://mesh-control.istio-system.svc:15012".into()));
        assert!(args.contains(&"--xds-root-cert=/var/run/secrets/istio/root-cert.pem".into()));
        let mount = container
            .volume_mounts
            .as_ref()
            .unwrap()
            .iter()
            .find(|m| m.name == "mesh-root")
            .expect("root mounted");
        assert_eq!(mount.mount_path, root_cert::MOUNT_DIR);
        let volume = pod
            .volumes
            .unwrap()
            .into_iter()
            .find(|v| v.name == "mesh-root")
            .expect("root volume");
        assert_eq!(volume.config_map.unwrap().name, root_cert::CONFIG_MAP);
    }

    #[test]
    fn a_waypoint_is_a_deployment_and_service_owned_by_its_gateway() {
        let objects = render(&gateway(), &template());
        for meta in [
            &objects.deployment.metadata,
            &objects.service.metadata,
            &objects.service_account.metadata,
        ] {
            assert_eq!(meta.name.as_deref(), Some("waypoint"));
            assert_eq!(meta.namespace.as_deref(), Some("shop"));
            let owner = &meta.owner_references.as_ref().unwrap()[0];
            assert_eq!(
                (owner.kind.as_str(), owner.name.as_str(), owner.uid.as_str()),
                ("Gateway", "waypoint", "uid-1")
            );
            assert_eq!(owner.api_version, "gateway.networking.k8s.io/v1");
        }
        let spec = objects.deployment.spec;
        let pod = spec.template.metadata.unwrap().labels.unwrap();
        assert_eq!(pod[GATEWAY_NAME_LABEL], "waypoint");
        assert_eq!(pod[DATAPLANE_MODE_LABEL], "none", "never captured");
        assert_eq!(
            spec.selector.match_labels.unwrap(),
            BTreeMap::from([(GATEWAY_NAME_LABEL.to_owned(), "waypoint".to_owned())])
        );
        let pod_spec = spec.template.spec.unwrap();
        assert_eq!(pod_spec.service_account_name.as_deref(), Some("waypoint"));
        let container = &pod_spec.containers[0];
        assert_eq!(
            container.image.as_deref(),
            Some("ghcr.io/mesh/waypoint:0.1.0")
        );
        let args = container.args.clone().unwrap();
        for arg in [
            "--xds-address=http://mesh-control.istio-system.svc:15010",
            "--xds-token-file=/var/run/secrets/tokens/mesh-token",
            "--trust-domain=cluster.local",
        ] {
            assert!(args.iter().any(|a| a == arg), "{arg}: {args:?}");
        }
        let env: Vec<&str> = container
            .env
            .iter()
            .flatten()
            .map(|e| e.name.as_str())
            .collect();
        for var in [
            "POD_NAMESPACE",
            "GATEWAY_NAME",
            "SERVICE_ACCOUNT",
            "INSTANCE_IP",
        ] {
            assert!(env.contains(&var), "{var}: {env:?}");
        }
        let ports: Vec<i32> = container
            .ports
            .iter()
            .flatten()
            .map(|p| p.container_port)
            .collect();
        assert_eq!(ports, [15008, 15020, 15021]);
        let probe = container.readiness_probe.as_ref().unwrap();
        let probe = probe.http_get.as_ref().unwrap();
        assert_eq!(probe.path.as_deref(), Some("/healthz/ready"));
        assert_eq!(probe.port, IntOrString::Int(15021));
        let resources = container.resources.as_ref().unwrap();
        assert_eq!(resources.requests.as_ref().unwrap()["cpu"].0, "100m");
        assert_eq!(resources.limits.as_ref().unwrap()["memory"].0, "512Mi");
        let audience = pod_spec.volumes.as_ref().unwrap()[0]
            .projected
            .as_ref()
            .and_then(|p| p.sources.as_ref())
            .and_then(|s| s[0].service_account_token.as_ref())
            .and_then(|t| t.audience.clone());
        assert_eq!(audience.as_deref(), Some("istio-ca"));

        let service = objects.service.spec.unwrap();
        assert_eq!(service.selector.unwrap()[GATEWAY_NAME_LABEL], "waypoint");
        let ports: Vec<(Option<&str>, i32)> = service
            .ports
            .iter()
            .flatten()
            .map(|p| (p.name.as_deref(), p.port))
            .collect();
        assert_eq!(ports, [(Some("mesh"), 15008), (Some("status-port"), 15021)]);
    }

    #[test]
    fn rendered_objects_serialise_with_their_kind() {
        let objects = render(&gateway(), &template());
        let deployment = serde_json::to_value(&objects.deployment).unwrap();
        assert_eq!(deployment["apiVersion"], "apps/v1");
        assert_eq!(deployment["kind"], "Deployment");
        let service = serde_json::to_value(&objects.service).unwrap();
        assert_eq!(service["kind"], "Service");
    }

    #[test]
    fn an_ingress_gateway_is_named_as_istio_names_it_and_exposes_its_listeners() {
        let object = DynamicObject::new(
            "bookinfo-gateway",
            &ApiResource::erase::<k8s_openapi::api::core::v1::Service>(&()),
        )
        .within("shop")
        .data(json!({"spec": {"gatewayClassName": "istio", "listeners": [
            {"name": "http", "port": 80, "protocol": "HTTP"},
            {"name": "other-http", "port": 80, "protocol": "HTTP", "hostname": "a.example.com"},
            {"name": "https", "port": 443, "protocol": "HTTPS"},
        ]}}));
        let mut object = object;
        object.metadata.uid = Some("uid-2".into());
        let gateway =
            GatewayRef::of("gateway.networking.k8s.io/v1", &object).expect("an ingress Gateway");
        assert_eq!(
            gateway.role,
            GatewayRole::Ingress(vec![("http".into(), 80), ("https".into(), 443)])
        );
        let objects = render(&gateway, &template());
        assert_eq!(
            objects.deployment.metadata.name.as_deref(),
            Some("bookinfo-gateway-istio")
        );
        let owner = &objects
            .deployment
            .metadata
            .owner_references
            .as_ref()
            .unwrap()[0];
        assert_eq!(
            (owner.name.as_str(), owner.uid.as_str()),
            ("bookinfo-gateway", "uid-2")
        );
        let pod = objects.deployment.spec.template.spec.unwrap();
        assert_eq!(
            pod.service_account_name.as_deref(),
            Some("bookinfo-gateway-istio")
        );
        let sysctls = pod.security_context.unwrap().sysctls.unwrap();
        assert_eq!(sysctls[0].name, "net.ipv4.ip_unprivileged_port_start");
        let container = &pod.containers[0];
        let env = container.env.as_ref().unwrap();
        let gateway_env = env.iter().find(|e| e.name == "GATEWAY_NAME").unwrap();
        assert_eq!(gateway_env.value.as_deref(), Some("bookinfo-gateway"));
        let ports: Vec<i32> = container
            .ports
            .as_ref()
            .unwrap()
            .iter()
            .map(|p| p.container_port)
            .collect();
        assert_eq!(ports, [15008, 15020, 15021, 80, 443]);
        let service = objects.service.spec.unwrap();
        assert_eq!(service.type_.as_deref(), Some("LoadBalancer"));
        assert_eq!(
            service.selector.unwrap()[GATEWAY_NAME_LABEL],
            "bookinfo-gateway"
        );
        let ports: Vec<(Option<&str>, i32)> = service
            .ports
            .as_ref()
            .unwrap()
            .iter()
            .map(|p| (p.name.as_deref(), p.port))
            .collect();
        assert_eq!(
            ports,
            [
                (Some("status-port"), 15021),
                (Some("http"), 80),
                (Some("https"), 443)
            ]
        );
    }

    #[test]
    fn only_waypoint_and_ingress_gateways_are_deployed() {
        let object = |class: &str| {
            let mut gw = DynamicObject::new(
                "waypoint",
                &ApiResource::erase::<k8s_openapi::api::core::v1::Service>(&()),
            )
            .within("shop")
            .data(json!({"spec": {"gatewayClassName": class}}));
            gw.metadata.uid = Some("uid-1".into());
            gw
        };
        let api = "gateway.networking.k8s.io/v1";
        assert_eq!(
            GatewayRef::of(api, &object(WAYPOINT_CLASS)),
            Some(gateway())
        );
        assert_eq!(GatewayRef::of(api, &object("other")), None);
    }

    #[test]
    fn status_reports_the_address_and_keeps_transition_times() {
        let pending = gateway_status(Some(1), None, None, "2026-01-01T00:00:00Z");
        assert_eq!(pending["addresses"], json!([]));
        assert_eq!(pending["conditions"][0]["type"], "Accepted");
        assert_eq!(pending["conditions"][1]["status"], "False");
        let ready = gateway_status(
            Some(1),
            Some("10.96.0.20"),
            Some(&pending),
            "2026-01-01T00:01:00Z",
        );
        assert_eq!(
            ready["addresses"],
            json!([{"type": "IPAddress", "value": "10.96.0.20"}])
        );
        assert_eq!(ready["conditions"][1]["status"], "True");
        // Accepted did not change: its transition time stays.
        assert_eq!(
            ready["conditions"][0]["lastTransitionTime"],
            "2026-01-01T00:00:00Z"
        );
        assert_eq!(
            ready["conditions"][1]["lastTransitionTime"],
            "2026-01-01T00:01:00Z"
        );
        // The same inputs give the same status: no needless patch.
        let again = gateway_status(
            Some(1),
            Some("10.96.0.20"),
            Some(&ready),
            "2026-01-01T00:02:00Z",
        );
        assert_eq!(again, ready);
    }
}
