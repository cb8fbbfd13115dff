//! The gRPC admin API (SPEC CTRL-6): `gatehouse.admin.v1.Admin` (proto/gatehouse/admin/v1/
//! admin.proto) and the standard `grpc.health.v1.Health`, served on the admin listener next
//! to REST — `admin.rs` hands every `application/grpc` request here.
//!
//! Nothing is decided twice: each RPC authenticates with `Admin::authenticate` (the same
//! tokens, scopes, client certificates and per-source failure limiter as REST) and runs the
//! same functions as its REST endpoint (`Control::apply`, `rollback`, `edit`,
//! `apply_bundle`, `admin::Kind`, `admin::status`, …). Errors are the REST errors, mapped
//! from their HTTP status to a gRPC code in `code_of`.
//!
//! The health service reports SERVING for "" and `gatehouse.admin.v1.Admin` while `/ready`
//! is true and NOT_SERVING once a drain starts (checked every `HEALTH_POLL`).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, StatusCode};
use hyper::body::Incoming;
use serde_json::{json, Value};
use tonic::codegen::Service;
use tonic::{Code, Request, Response, Status};
use tonic_health::pb::health_server::HealthServer;
use tonic_health::server::{HealthReporter, HealthService};
use tonic_health::ServingStatus;

use super::admin::{self, Admin, ApiError, ChangeMeta, Kind, Peer};
use super::{Change, ControlError, Outcome};
use crate::config::{AdminScope, Format};

/// The generated server code.
#[allow(clippy::all, missing_docs, unreachable_pub)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/server/gatehouse.admin.v1.rs"));
}

use pb::admin_server::{AdminServer, SERVICE_NAME};

/// How often the health service looks at the draining flag.
const HEALTH_POLL: Duration = Duration::from_millis(100);
/// Longest an admin RPC may take, from its request head to its answer (request bodies are
/// bounded to 30 s on REST; applies and store work finish well within the rest).
const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest change message kept (as `x-gatehouse-message` on REST).
const MAX_MESSAGE_BYTES: usize = 1024;

/// The gRPC side of one admin listener.
pub(super) struct Grpc {
    health: HealthServer<HealthService>,
}

impl Grpc {
    /// Builds the services and starts the task that moves the health status with `/ready`.
    pub(super) async fn start(control: Arc<super::Control>) -> Grpc {
        let reporter = HealthReporter::new();
        reporter
            .set_service_status(SERVICE_NAME, ServingStatus::Serving)
            .await;
        let health = HealthServer::new(HealthService::from_health_reporter(reporter.clone()));
        tokio::spawn(follow_readiness(control, reporter));
        Grpc { health }
    }

    /// Serves one gRPC request. `peer` goes into the request's extensions for auth.
    pub(super) async fn call(
        &self,
        admin: Arc<Admin>,
        mut request: http::Request<Incoming>,
        peer: Peer,
    ) -> http::Response<tonic::body::Body> {
        request.extensions_mut().insert(peer);
        let path = request.uri().path();
        let result: Result<_, Infallible> = if path.starts_with("/grpc.health.v1.Health/") {
            self.health.clone().call(request).await
        } else if path.starts_with(&format!("/{SERVICE_NAME}/")) {
            // A unary call reads its whole request before answering: bound the time a slow
            // client may hold a stream, as REST bounds a body.
            let call = AdminServer::new(AdminRpc { admin })
                .max_decoding_message_size(admin::MAX_BODY_BYTES)
                .call(request);
            match tokio::time::timeout(CALL_TIMEOUT, call).await {
                Ok(result) => result,
                Err(_) => Ok(Status::deadline_exceeded(format!(
                    "the call did not complete within {}s",
                    CALL_TIMEOUT.as_secs()
                ))
                .into_http()),
            }
        } else {
            Ok(Status::unimplemented(format!("no gRPC service at {path}")).into_http())
        };
        match result {
            Ok(response) => response,
            Err(never) => match never {},
        }
    }
}

/// Sets SERVING / NOT_SERVING as the gateway's draining flag changes.
async fn follow_readiness(control: Arc<super::Control>, reporter: HealthReporter) {
    let mut serving = true;
    loop {
        let now = !control.gateway().is_draining();
        if now != serving {
            serving = now;
            let status = if serving {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            for service in ["", SERVICE_NAME] {
                reporter.set_service_status(service, status).await;
            }
            tracing::info!(serving, "gRPC health status changed");
        }
        tokio::time::sleep(HEALTH_POLL).await;
    }
}

/// REST error → gRPC status, by the HTTP status the REST API would answer.
fn to_status(err: ApiError) -> Status {
    let http = err.status();
    if http.is_server_error() {
        tracing::error!(error = %err, "admin gRPC request failed");
    }
    let message = match &err {
        ApiError::Control(ControlError::Invalid(errors)) => {
            let lines: Vec<String> = errors.0.iter().map(ToString::to_string).collect();
            format!(
                "{} error(s) in the config: {}",
                errors.0.len(),
                lines.join("; ")
            )
        }
        other => other.to_string(),
    };
    Status::new(code_of(http), message)
}

fn code_of(status: StatusCode) -> Code {
    match status {
        StatusCode::BAD_REQUEST
        | StatusCode::UNPROCESSABLE_ENTITY
        | StatusCode::UNSUPPORTED_MEDIA_TYPE => Code::InvalidArgument,
        StatusCode::UNAUTHORIZED => Code::Unauthenticated,
        StatusCode::FORBIDDEN => Code::PermissionDenied,
        StatusCode::NOT_FOUND => Code::NotFound,
        StatusCode::PRECONDITION_FAILED | StatusCode::CONFLICT => Code::FailedPrecondition,
        StatusCode::TOO_MANY_REQUESTS | StatusCode::PAYLOAD_TOO_LARGE => Code::ResourceExhausted,
        StatusCode::REQUEST_TIMEOUT => Code::DeadlineExceeded,
        _ => Code::Internal,
    }
}

struct AdminRpc {
    admin: Arc<Admin>,
}

type RpcResult<T> = Result<Response<T>, Status>;

impl AdminRpc {
    /// Authenticates like REST: the `authorization` metadata is the `Authorization` header.
    fn auth<T>(&self, request: &Request<T>, scope: AdminScope) -> Result<String, Status> {
        let peer = request
            .extensions()
            .get::<Peer>()
            .cloned()
            .unwrap_or_default();
        let mut headers = HeaderMap::new();
        if let Some(value) = request.metadata().get("authorization") {
            if let Ok(value) = http::HeaderValue::from_bytes(value.as_bytes()) {
                headers.insert(http::header::AUTHORIZATION, value);
            }
        }
        self.admin
            .authenticate(&headers, scope, &peer)
            .map(|caller| caller.actor)
            .map_err(to_status)
    }

    fn control(&self) -> Arc<super::Control> {
        self.admin.control.clone()
    }
}

fn meta(actor: String, options: Option<pb::ChangeOptions>) -> Result<ChangeMeta, Status> {
    let options = options.unwrap_or_default();
    if options.message.len() > MAX_MESSAGE_BYTES {
        return Err(Status::invalid_argument(format!(
            "options.message is longer than {MAX_MESSAGE_BYTES} bytes"
        )));
    }
    if options.expected_version < 0 {
        return Err(Status::invalid_argument(
            "options.expected_version: must be 0 (any) or a config version",
        ));
    }
    Ok(ChangeMeta {
        actor,
        if_match: (options.expected_version > 0).then_some(options.expected_version),
        message: options.message,
    })
}

/// The REST query of a guarded apply, so both APIs take gates through `admin::gates`.
fn guard_query(guard: pb::GuardOptions) -> Result<String, Status> {
    let mut query = form_urlencoded::Serializer::new(String::new());
    if !guard.bake.is_empty() {
        query.append_pair("bake", &guard.bake);
    }
    if let Some(rate) = guard.max_5xx_rate {
        query.append_pair("max_5xx_rate", &rate.to_string());
    }
    if !guard.max_p95.is_empty() {
        query.append_pair("max_p95", &guard.max_p95);
    }
    if let Some(count) = guard.min_requests {
        query.append_pair("min_requests", &count.to_string());
    }
    let query = query.finish();
    if query.is_empty() {
        return Err(Status::invalid_argument(
            "guard: give bake and at least one gate (max_5xx_rate, max_p95), or leave guard out",
        ));
    }
    Ok(query)
}

fn json_reply(version: i64, value: &Value) -> RpcResult<pb::JsonReply> {
    Ok(Response::new(pb::JsonReply {
        json: value.to_string(),
        version,
    }))
}

fn change_reply(outcome: Outcome, created: bool) -> RpcResult<pb::ChangeReply> {
    Ok(Response::new(pb::ChangeReply {
        version: outcome.info.version,
        hash: outcome.info.hash,
        changed: outcome.changed,
        previous_version: outcome.previous_version.unwrap_or(0),
        created,
        guard_json: String::new(),
    }))
}

fn parse_json(field: &str, text: &str) -> Result<Value, Status> {
    serde_json::from_str(text)
        .map_err(|err| Status::invalid_argument(format!("{field}: invalid JSON: {err}")))
}

fn format_of(format: i32) -> Result<Format, Status> {
    match pb::ConfigFormat::try_from(format) {
        Ok(pb::ConfigFormat::Json) => Ok(Format::Json),
        Ok(pb::ConfigFormat::Toml) => Ok(Format::Toml),
        Err(_) => Err(Status::invalid_argument(format!(
            "format: {format} is not a ConfigFormat"
        ))),
    }
}

impl AdminRpc {
    /// Parses a submitted config as REST does: syntax errors first, then validation.
    fn submitted(&self, text: &str, format: i32) -> Result<crate::config::Config, Status> {
        let format = format_of(format)?;
        match format {
            Format::Json => serde_json::from_str::<Value>(text)
                .map(drop)
                .map_err(|err| Status::invalid_argument(format!("invalid JSON: {err}")))?,
            Format::Toml => toml::from_str::<toml::Table>(text)
                .map(drop)
                .map_err(|err| {
                    Status::invalid_argument(format!(
                        "invalid TOML: {}",
                        err.to_string().trim_end()
                    ))
                })?,
        }
        self.admin
            .control
            .parse_submitted(text, format)
            .map_err(|err| to_status(err.into()))
    }

    async fn edit(
        &self,
        meta: ChangeMeta,
        edit: Result<admin::ResourceEdit, ApiError>,
    ) -> RpcResult<pb::ChangeReply> {
        let edit = edit.map_err(to_status)?;
        let (outcome, created) = admin::run_edit(self.control(), meta, edit)
            .await
            .map_err(to_status)?;
        change_reply(outcome, created)
    }
}

#[tonic::async_trait]
impl pb::admin_server::Admin for AdminRpc {
    async fn status(&self, request: Request<pb::StatusRequest>) -> RpcResult<pb::JsonReply> {
        self.auth(&request, AdminScope::Read)?;
        let control = self.control();
        json_reply(control.current().info.version, &admin::status(&control))
    }

    async fn breakers(&self, request: Request<pb::Empty>) -> RpcResult<pb::JsonReply> {
        self.auth(&request, AdminScope::Read)?;
        let control = self.control();
        json_reply(control.current().info.version, &admin::breakers(&control))
    }

    async fn get_config(&self, request: Request<pb::Empty>) -> RpcResult<pb::ConfigReply> {
        self.auth(&request, AdminScope::Read)?;
        let current = self.control().current();
        let config_json = serde_json::to_string(&*current.config)
            .map_err(|err| to_status(ControlError::from(err).into()))?;
        Ok(Response::new(pb::ConfigReply {
            version: current.info.version,
            hash: current.info.hash.clone(),
            author: current.info.author.clone(),
            created_at: current.info.created_at.clone(),
            message: current.info.message.clone(),
            config_json,
        }))
    }

    async fn validate(&self, request: Request<pb::ConfigRequest>) -> RpcResult<pb::ValidateReply> {
        self.auth(&request, AdminScope::Read)?;
        let request = request.into_inner();
        let config = self.submitted(&request.config, request.format)?;
        self.admin
            .control
            .check(&config)
            .map_err(|err| to_status(err.into()))?;
        Ok(Response::new(pb::ValidateReply { valid: true }))
    }

    async fn diff(&self, request: Request<pb::ConfigRequest>) -> RpcResult<pb::JsonReply> {
        self.auth(&request, AdminScope::Read)?;
        let request = request.into_inner();
        let config = self.submitted(&request.config, request.format)?;
        let current = self.control().current();
        let body = admin::diff_body(&current, &config).map_err(to_status)?;
        json_reply(current.info.version, &body)
    }

    async fn apply(&self, request: Request<pb::ApplyRequest>) -> RpcResult<pb::ChangeReply> {
        let actor = self.auth(&request, AdminScope::Admin)?;
        let request = request.into_inner();
        let meta = meta(actor, request.options)?;
        let gates = request.guard.map(guard_query).transpose()?;
        let gates = admin::gates(gates.as_deref()).map_err(to_status)?;
        let config = self.submitted(&request.config, request.format)?;
        let control = self.control();
        let outcome = admin::blocking(move || {
            control.apply(
                config,
                &Change {
                    actor: &meta.actor,
                    action: "apply",
                    message: &meta.message,
                    if_match: meta.if_match,
                },
            )
        })
        .await
        .and_then(|result| result.map_err(ApiError::from))
        .map_err(to_status)?;
        let guard = admin::start_guard(&self.admin.control, &outcome, gates);
        let mut reply = change_reply(outcome, false)?;
        if let Some(guard) = guard {
            reply.get_mut().guard_json = serde_json::to_string(&guard)
                .map_err(|err| to_status(ControlError::from(err).into()))?;
        }
        Ok(reply)
    }

    async fn apply_bundle(
        &self,
        request: Request<pb::BundleRequest>,
    ) -> RpcResult<pb::ChangeReply> {
        let actor = self.auth(&request, AdminScope::Admin)?;
        let request = request.into_inner();
        let meta = meta(actor, request.options)?;
        let outcome = admin::apply_bundle(self.control(), meta, request.bundle_json)
            .await
            .map_err(to_status)?;
        change_reply(outcome, false)
    }

    async fn list_versions(
        &self,
        request: Request<pb::ListVersionsRequest>,
    ) -> RpcResult<pb::JsonReply> {
        self.auth(&request, AdminScope::Read)?;
        let limit = request.into_inner().limit;
        let query = (limit != 0).then(|| format!("limit={limit}"));
        let limit = admin::list_limit(query.as_deref()).map_err(to_status)?;
        let control = self.control();
        let versions = admin::blocking(move || control.versions(limit))
            .await
            .and_then(|result| result.map_err(ApiError::from))
            .map_err(to_status)?;
        let current = self.control().current().info.version;
        json_reply(current, &json!({"current": current, "versions": versions}))
    }

    async fn rollback(&self, request: Request<pb::RollbackRequest>) -> RpcResult<pb::ChangeReply> {
        let actor = self.auth(&request, AdminScope::Admin)?;
        let request = request.into_inner();
        if request.version < 1 {
            return Err(Status::invalid_argument(
                "version: must be a positive integer",
            ));
        }
        let version = request.version;
        let meta = meta(actor, request.options)?;
        let outcome = admin::rollback(self.control(), meta, version)
            .await
            .map_err(to_status)?;
        change_reply(outcome, false)
    }

    async fn list_resources(
        &self,
        request: Request<pb::ListResourcesRequest>,
    ) -> RpcResult<pb::JsonReply> {
        self.auth(&request, AdminScope::Read)?;
        let kind = Kind::parse(&request.get_ref().kind).map_err(to_status)?;
        let (version, body) = kind.list(&self.control()).map_err(to_status)?;
        json_reply(version, &body)
    }

    async fn get_resource(
        &self,
        request: Request<pb::ResourceRequest>,
    ) -> RpcResult<pb::JsonReply> {
        self.auth(&request, AdminScope::Read)?;
        let request = request.into_inner();
        let kind = Kind::parse(&request.kind).map_err(to_status)?;
        let (version, body) = kind
            .get(&self.control(), &request.name)
            .map_err(to_status)?;
        json_reply(version, &body)
    }

    async fn put_resource(
        &self,
        request: Request<pb::PutResourceRequest>,
    ) -> RpcResult<pb::ChangeReply> {
        let actor = self.auth(&request, AdminScope::Admin)?;
        let request = request.into_inner();
        let kind = Kind::parse(&request.kind).map_err(to_status)?;
        if request.name.is_empty() {
            return Err(Status::invalid_argument("name: must not be empty"));
        }
        let meta = meta(actor, request.options)?;
        let body = parse_json("json", &request.json)?;
        self.edit(meta, kind.put(request.name, body)).await
    }

    async fn delete_resource(
        &self,
        request: Request<pb::DeleteResourceRequest>,
    ) -> RpcResult<pb::ChangeReply> {
        let actor = self.auth(&request, AdminScope::Admin)?;
        let request = request.into_inner();
        let kind = Kind::parse(&request.kind).map_err(to_status)?;
        let meta = meta(actor, request.options)?;
        self.edit(meta, kind.delete(request.name)).await
    }

    async fn get_firewall(&self, request: Request<pb::Empty>) -> RpcResult<pb::JsonReply> {
        self.auth(&request, AdminScope::Read)?;
        let current = self.control().current();
        let body = serde_json::to_value(&current.config.firewall)
            .map_err(|err| to_status(ControlError::from(err).into()))?;
        json_reply(current.info.version, &body)
    }

    async fn put_firewall(
        &self,
        request: Request<pb::PutFirewallRequest>,
    ) -> RpcResult<pb::ChangeReply> {
        let actor = self.auth(&request, AdminScope::Admin)?;
        let request = request.into_inner();
        let meta = meta(actor, request.options)?;
        let body = parse_json("json", &request.json)?;
        self.edit(meta, admin::put_firewall(body)).await
    }

    async fn get_max_connections(
        &self,
        request: Request<pb::ListenerRequest>,
    ) -> RpcResult<pb::MaxConnectionsReply> {
        self.auth(&request, AdminScope::Read)?;
        let name = request.into_inner().listener;
        let control = self.control();
        let current = control.current();
        let listener = current
            .config
            .listeners
            .iter()
            .find(|listener| listener.name == name)
            .ok_or_else(|| {
                to_status(
                    ControlError::UnknownName {
                        kind: "listener",
                        name: name.clone(),
                    }
                    .into(),
                )
            })?;
        let active = control.gateway().listener_stats(&name).map_or(0, |stats| {
            stats.active.load(std::sync::atomic::Ordering::Relaxed) as u64
        });
        Ok(Response::new(pb::MaxConnectionsReply {
            listener: name.clone(),
            max_connections: listener.max_connections,
            active_connections: active,
            version: current.info.version,
        }))
    }

    async fn set_max_connections(
        &self,
        request: Request<pb::SetMaxConnectionsRequest>,
    ) -> RpcResult<pb::ChangeReply> {
        let actor = self.auth(&request, AdminScope::Admin)?;
        let request = request.into_inner();
        let meta = meta(actor, request.options)?;
        let outcome = admin::set_max_connections(
            self.control(),
            meta,
            request.listener,
            request.max_connections,
        )
        .await
        .map_err(to_status)?;
        change_reply(outcome, false)
    }
}
