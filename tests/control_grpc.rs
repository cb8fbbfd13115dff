//! The gRPC admin API (SPEC CTRL-6) against the real binary, with a real tonic client
//! generated from the same proto (proto/gatehouse/admin/v1/admin.proto): every operation,
//! auth failures, a stale apply, the failed-auth limit shared with REST, and the standard
//! health service turning NOT_SERVING when a drain starts.

mod support;

use std::sync::Arc;

use http::{Response, StatusCode};
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};
use tonic::transport::Channel;
use tonic::{Code, Request};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use support::{full, http1_client, Backend, Gateway, PATIENCE};

#[allow(clippy::all)]
mod pb {
    include!(concat!(env!("OUT_DIR"), "/client/gatehouse.admin.v1.rs"));
}

use pb::admin_client::AdminClient;

const ADMIN_TOKEN: &str = "grpc-admin-token-0123456789";
const READ_TOKEN: &str = "grpc-read-token-9876543210";

fn tokens() -> String {
    let hash = |secret: &str| gatehouse::control::sha256_hex(secret.as_bytes());
    format!(
        "[[admin.tokens]]\nname = \"ops\"\nsha256 = \"{}\"\nscope = \"admin\"\n\n[[admin.tokens]]\nname = \"dashboards\"\nsha256 = \"{}\"\nscope = \"read\"\n",
        hash(ADMIN_TOKEN),
        hash(READ_TOKEN)
    )
}

/// Admin listener with tokens, listener `public`, pool `app` and one route answering `body`.
fn config(body: &str, backend: std::net::SocketAddr) -> String {
    format!(
        "[admin]\nbind = \"127.0.0.1:0\"\n{}\n[[listeners]]\nname = \"public\"\nbind = \"127.0.0.1:0\"\nmax_connections = 50\n\n[[pools]]\nname = \"app\"\nendpoints = [\"{backend}\"]\n\n[[routes]]\nname = \"main\"\ndirect_response = {{ body = \"{body}\" }}\n",
        tokens()
    )
}

async fn channel(gateway: &Gateway) -> Channel {
    tokio::time::timeout(
        PATIENCE,
        Channel::from_shared(format!("http://{}", gateway.addr("admin")))
            .expect("uri")
            .connect(),
    )
    .await
    .expect("connect in time")
    .expect("connect")
}

fn with_token<T>(message: T, token: &str) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("metadata"),
    );
    request
}

fn admin<T>(message: T) -> Request<T> {
    with_token(message, ADMIN_TOKEN)
}

fn options(expected_version: i64, message: &str) -> Option<pb::ChangeOptions> {
    Some(pb::ChangeOptions {
        expected_version,
        message: message.into(),
    })
}

async fn body_of(gateway: &Gateway, path: &str) -> String {
    let response = http1_client()
        .get(gateway.url("public", path))
        .send()
        .await
        .expect("data-plane request");
    response.text().await.expect("body")
}

fn json(reply: &pb::JsonReply) -> Value {
    serde_json::from_str(&reply.json).expect("reply JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_admin_mirrors_rest_with_auth_and_optimistic_concurrency() {
    let backend = Backend::echo().await;
    let gateway = Gateway::start(&config("one", backend.addr));
    let mut client = AdminClient::new(channel(&gateway).await);

    // Auth: none, wrong, read scope for a change.
    let err = client
        .status(Request::new(pb::StatusRequest {}))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err}");
    let err = client
        .status(with_token(pb::StatusRequest {}, "guess"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err}");
    let status = client
        .status(with_token(pb::StatusRequest {}, READ_TOKEN))
        .await
        .expect("status with the read token")
        .into_inner();
    let document = json(&status);
    let v1 = status.version;
    assert_eq!(document["version"], json!(v1));
    assert_eq!(document["ready"], json!(true));
    assert_eq!(document["listeners"][0]["name"], "public");

    // GetConfig, Validate (bad), Diff.
    let current = client
        .get_config(admin(pb::Empty {}))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(current.version, v1);
    let config_json: Value = serde_json::from_str(&current.config_json).unwrap();
    assert_eq!(config_json["routes"][0]["name"], "main");
    let two = config("two", backend.addr);
    let bad = two.replace("endpoints = [", "endpoints = 7 #[");
    let err = client
        .validate(admin(pb::ConfigRequest {
            config: bad,
            format: pb::ConfigFormat::Toml as i32,
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    assert!(err.message().contains("pools[0].endpoints"), "{err}");
    let valid = client
        .validate(admin(pb::ConfigRequest {
            config: two.clone(),
            format: pb::ConfigFormat::Toml as i32,
        }))
        .await
        .unwrap()
        .into_inner();
    assert!(valid.valid);
    let diff = client
        .diff(admin(pb::ConfigRequest {
            config: two.clone(),
            format: pb::ConfigFormat::Toml as i32,
        }))
        .await
        .unwrap()
        .into_inner();
    assert!(
        json(&diff)["text"].as_str().unwrap().contains("two"),
        "{}",
        diff.json
    );

    // Apply: the read token may not; the admin token may; a stale version is refused.
    let apply = |expected: i64| pb::ApplyRequest {
        config: two.clone(),
        format: pb::ConfigFormat::Toml as i32,
        options: options(expected, "over gRPC"),
        guard: None,
    };
    let err = client
        .apply(with_token(apply(v1), READ_TOKEN))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    let applied = client.apply(admin(apply(v1))).await.unwrap().into_inner();
    assert!(applied.changed);
    assert_eq!(applied.previous_version, v1);
    let v2 = applied.version;
    assert_eq!(body_of(&gateway, "/").await, "two");
    let three = config("three", backend.addr);
    let err = client
        .apply(admin(pb::ApplyRequest {
            config: three,
            format: pb::ConfigFormat::Toml as i32,
            options: options(v1, ""),
            guard: None,
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
    assert!(err.message().contains(&format!("({v2})")), "{err}");
    assert_eq!(body_of(&gateway, "/").await, "two");

    // Versions and rollback.
    let versions = client
        .list_versions(admin(pb::ListVersionsRequest { limit: 10 }))
        .await
        .unwrap()
        .into_inner();
    let versions = json(&versions);
    assert_eq!(versions["current"], json!(v2));
    assert_eq!(versions["versions"][0]["message"], "over gRPC");
    let rolled = client
        .rollback(admin(pb::RollbackRequest {
            version: v1,
            options: options(v2, ""),
        }))
        .await
        .unwrap()
        .into_inner();
    assert!(rolled.changed);
    assert_eq!(body_of(&gateway, "/").await, "one");
    let err = client
        .rollback(admin(pb::RollbackRequest {
            version: 999,
            options: None,
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err}");

    // Routes as resources.
    let put = client
        .put_resource(admin(pb::PutResourceRequest {
            kind: "route".into(),
            name: "extra".into(),
            json: json!({"match": {"path_prefix": "/extra"}, "direct_response": {"body": "extra"}})
                .to_string(),
            options: None,
        }))
        .await
        .unwrap()
        .into_inner();
    assert!(put.created && put.changed);
    assert_eq!(body_of(&gateway, "/extra").await, "extra");
    let routes = client
        .list_resources(admin(pb::ListResourcesRequest {
            kind: "route".into(),
        }))
        .await
        .unwrap()
        .into_inner();
    let names: Vec<Value> = json(&routes)["routes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|route| route["name"].clone())
        .collect();
    assert_eq!(names, vec![json!("main"), json!("extra")]);
    let route = client
        .get_resource(admin(pb::ResourceRequest {
            kind: "route".into(),
            name: "extra".into(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(json(&route)["match"]["path_prefix"], "/extra");
    let err = client
        .put_resource(admin(pb::PutResourceRequest {
            kind: "route".into(),
            name: "broken".into(),
            json: json!({"pool": "nope"}).to_string(),
            options: None,
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    assert!(err.message().contains("routes[2].pool"), "{err}");
    client
        .delete_resource(admin(pb::DeleteResourceRequest {
            kind: "route".into(),
            name: "extra".into(),
            options: None,
        }))
        .await
        .unwrap();
    let err = client
        .get_resource(admin(pb::ResourceRequest {
            kind: "route".into(),
            name: "extra".into(),
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err}");
    let err = client
        .list_resources(admin(pb::ListResourcesRequest {
            kind: "widgets".into(),
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");

    // A route's L7 policies, named ROUTE/POLICY.
    let status_with_agent = |agent: &'static str| {
        let url = format!("http://{}/", gateway.addr("public"));
        async move {
            reqwest::Client::builder()
                .no_proxy()
                .build()
                .unwrap()
                .get(url)
                .header("user-agent", agent)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!(status_with_agent("badbot/1.0").await, 200);
    let put = client
        .put_resource(admin(pb::PutResourceRequest {
            kind: "policy".into(),
            name: "main/no-bots".into(),
            json: json!({"action": "deny", "user_agent": "BadBot"}).to_string(),
            options: None,
        }))
        .await
        .unwrap()
        .into_inner();
    assert!(put.changed);
    assert_eq!(status_with_agent("badbot/1.0").await, 403);
    assert_eq!(status_with_agent("curl/8").await, 200);
    let listed = client
        .list_resources(admin(pb::ListResourcesRequest {
            kind: "policies".into(),
        }))
        .await
        .unwrap()
        .into_inner();
    let listed = json(&listed);
    assert_eq!(listed["routes"][0]["route"], "main");
    assert_eq!(listed["routes"][0]["policies"][0]["name"], "no-bots");
    let policy = client
        .get_resource(admin(pb::ResourceRequest {
            kind: "policy".into(),
            name: "main/no-bots".into(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(json(&policy)["user_agent"], "BadBot");
    let err = client
        .get_resource(admin(pb::ResourceRequest {
            kind: "policy".into(),
            name: "no-slash".into(),
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    client
        .delete_resource(admin(pb::DeleteResourceRequest {
            kind: "policy".into(),
            name: "main/no-bots".into(),
            options: None,
        }))
        .await
        .unwrap();
    assert_eq!(status_with_agent("badbot/1.0").await, 200);

    // Pools.
    let put = client
        .put_resource(admin(pb::PutResourceRequest {
            kind: "pool".into(),
            name: "spare".into(),
            json: json!({"endpoints": [backend.addr.to_string()], "circuit_breaker": {}})
                .to_string(),
            options: None,
        }))
        .await
        .unwrap()
        .into_inner();
    assert!(put.created);
    let pools = client
        .list_resources(admin(pb::ListResourcesRequest {
            kind: "pool".into(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(json(&pools)["pools"][1]["name"], "spare");
    let breakers = client
        .breakers(admin(pb::Empty {}))
        .await
        .unwrap()
        .into_inner();
    let breakers = json(&breakers);
    assert_eq!(breakers["breakers"][0]["pool"], "app");
    assert_eq!(breakers["breakers"][0]["state"], "disabled");
    assert_eq!(breakers["breakers"][1]["pool"], "spare");
    assert_eq!(breakers["breakers"][1]["state"], "closed");

    // Firewall.
    let put = client
        .put_firewall(admin(pb::PutFirewallRequest {
            json: json!({"deny_cidrs": ["192.0.2.0/24"]}).to_string(),
            options: None,
        }))
        .await
        .unwrap()
        .into_inner();
    assert!(put.changed);
    let firewall = client
        .get_firewall(admin(pb::Empty {}))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(json(&firewall)["deny_cidrs"], json!(["192.0.2.0/24"]));
    let err = client
        .put_firewall(admin(pb::PutFirewallRequest {
            json: "{not json".into(),
            options: None,
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");

    // Listener limits.
    let limit = client
        .get_max_connections(admin(pb::ListenerRequest {
            listener: "public".into(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(limit.max_connections, 50);
    client
        .set_max_connections(admin(pb::SetMaxConnectionsRequest {
            listener: "public".into(),
            max_connections: 7,
            options: None,
        }))
        .await
        .unwrap();
    let limit = client
        .get_max_connections(admin(pb::ListenerRequest {
            listener: "public".into(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(limit.max_connections, 7);
    let err = client
        .set_max_connections(admin(pb::SetMaxConnectionsRequest {
            listener: "nope".into(),
            max_connections: 7,
            options: None,
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err}");

    // Every gRPC change is in the audit log with its actor, like a REST one.
    let audit: Value = http1_client()
        .get(format!("http://{}/audit?limit=100", gateway.addr("admin")))
        .bearer_auth(READ_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let actions: Vec<(String, String)> = audit["records"]
        .as_array()
        .unwrap()
        .iter()
        .rev()
        .filter(|record| record["actor"] == "ops")
        .map(|record| {
            (
                record["action"].as_str().unwrap().to_string(),
                record["actor"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let actions: Vec<&str> = actions.iter().map(|(action, _)| action.as_str()).collect();
    assert_eq!(
        actions,
        [
            "apply",
            "rollback",
            "put_route",
            "delete_route",
            "put_policy",
            "delete_policy",
            "put_pool",
            "put_firewall",
            "set_max_connections"
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_authentications_are_limited_across_rest_and_grpc() {
    let backend = Backend::echo().await;
    let gateway = Gateway::start(&config("one", backend.addr));
    let rest = http1_client();
    let url = format!("http://{}/status", gateway.addr("admin"));
    for _ in 0..10 {
        let response = rest.get(&url).bearer_auth("guess").send().await.unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    }
    // The source is now refused over gRPC too, even with the right token.
    let mut client = AdminClient::new(channel(&gateway).await);
    let err = client
        .status(admin(pb::StatusRequest {}))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err}");
    assert!(err.message().contains("too many failed"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_health_is_serving_until_a_drain_starts() {
    // A backend that holds one request until released, so the drain lasts.
    let (arrived_tx, mut arrived) = mpsc::unbounded_channel::<()>();
    let (release, released) = watch::channel(false);
    let backend = Backend::start(Arc::new(move |_request| {
        let arrived = arrived_tx.clone();
        let mut released = released.clone();
        Box::pin(async move {
            let _ = arrived.send(());
            let _ = released.wait_for(|open| *open).await;
            Response::new(full("done"))
        })
    }))
    .await;
    let text = format!(
        "drain_timeout = \"120s\"\n[admin]\nbind = \"127.0.0.1:0\"\n{}\n[[listeners]]\nname = \"public\"\nbind = \"127.0.0.1:0\"\n\n[[pools]]\nname = \"app\"\nendpoints = [\"{}\"]\n\n[[routes]]\npool = \"app\"\n",
        tokens(),
        backend.addr
    );
    let mut gateway = Gateway::start(&text);
    let mut health = HealthClient::new(channel(&gateway).await);
    let check = |service: &str| HealthCheckRequest {
        service: service.into(),
    };
    for service in ["", "gatehouse.admin.v1.Admin"] {
        let reply = health
            .check(check(service))
            .await
            .unwrap_or_else(|err| panic!("check {service:?}: {err}"))
            .into_inner();
        assert_eq!(reply.status(), ServingStatus::Serving, "{service:?}");
    }
    let err = health.check(check("nope")).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let mut watch = health
        .watch(check("gatehouse.admin.v1.Admin"))
        .await
        .unwrap()
        .into_inner();
    let first = watch.message().await.unwrap().unwrap();
    assert_eq!(first.status(), ServingStatus::Serving);

    let url = gateway.url("public", "/slow");
    let held = tokio::spawn(async move { http1_client().get(url).send().await });
    tokio::time::timeout(PATIENCE, arrived.recv())
        .await
        .expect("held request arrives")
        .unwrap();
    gateway.signal(libc::SIGTERM);

    // The watch stream reports the change; a Check agrees.
    let next = tokio::time::timeout(PATIENCE, watch.message())
        .await
        .expect("health change within the patience")
        .unwrap()
        .unwrap();
    assert_eq!(next.status(), ServingStatus::NotServing);
    let reply = health.check(check("")).await.unwrap().into_inner();
    assert_eq!(reply.status(), ServingStatus::NotServing);

    release.send_replace(true);
    let response = tokio::time::timeout(PATIENCE, held)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(gateway.wait_exit(PATIENCE).success());
}

/// Dials the admin listener over TLS (with the given client config) for tonic.
#[derive(Clone)]
struct TlsConnect {
    addr: std::net::SocketAddr,
    config: Arc<rustls::ClientConfig>,
}

impl tonic::codegen::Service<http::Uri> for TlsConnect {
    type Response = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;
    type Error = std::io::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Uri) -> Self::Future {
        let (addr, config) = (self.addr, self.config.clone());
        Box::pin(async move {
            let stream = support::tls::connect(addr, "127.0.0.1", config).await?;
            Ok(hyper_util::rt::TokioIo::new(stream))
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_over_mutual_tls_takes_the_client_certificate_as_the_credential() {
    let dir = tempfile::tempdir().unwrap();
    let ca = support::tls::Ca::new("Ops CA");
    let ca_pem = ca.write(dir.path(), "ops-ca");
    let (server_cert, server_key) = ca.server(&["127.0.0.1"]).write(dir.path(), "admin");
    let client = ca.client("ops-client");
    let text = format!(
        "[admin]\nbind = \"127.0.0.1:0\"\ntls = {{ cert = {:?}, key = {:?}, client_ca = {:?} }}\n\n[[listeners]]\nname = \"public\"\nbind = \"127.0.0.1:0\"\nmax_connections = 50\n\n[[routes]]\ndirect_response = {{ body = \"one\" }}\n",
        server_cert.display().to_string(),
        server_key.display().to_string(),
        ca_pem.display().to_string(),
    );
    let gateway = Gateway::start(&text);
    let connect = |identity: Option<&support::tls::Pair>| {
        let connector = TlsConnect {
            addr: gateway.addr("admin"),
            config: support::tls::client_config(&ca.pem(), &["h2"], identity),
        };
        async move {
            tonic::transport::Endpoint::from_static("http://admin.invalid")
                .connect_with_connector(connector)
                .await
                .expect("TLS channel")
        }
    };

    // Without a client certificate: the health probe works, the admin service does not.
    let anonymous = connect(None).await;
    let mut health = HealthClient::new(anonymous.clone());
    let reply = health
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.status(), ServingStatus::Serving);
    let err = AdminClient::new(anonymous)
        .status(Request::new(pb::StatusRequest {}))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err}");
    assert!(err.message().contains("client certificate"), "{err}");

    // With it: an admin, audited by certificate subject.
    let mut client = AdminClient::new(connect(Some(&client)).await);
    let changed = client
        .set_max_connections(Request::new(pb::SetMaxConnectionsRequest {
            listener: "public".into(),
            max_connections: 9,
            options: None,
        }))
        .await
        .unwrap()
        .into_inner();
    assert!(changed.changed);
    let status = json(
        &client
            .status(Request::new(pb::StatusRequest {}))
            .await
            .unwrap()
            .into_inner(),
    );
    assert_eq!(status["listeners"][0]["max_connections"], 9);
    let versions = json(
        &client
            .list_versions(Request::new(pb::ListVersionsRequest { limit: 1 }))
            .await
            .unwrap()
            .into_inner(),
    );
    assert_eq!(
        versions["versions"][0]["author"], "cert:CN=ops-client, O=Gatehouse Tests",
        "{versions}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guarded_apply_over_grpc_rolls_back_when_a_gate_is_crossed() {
    let backend = Backend::echo().await;
    let gateway = Gateway::start(&config("one", backend.addr));
    let mut client = AdminClient::new(channel(&gateway).await);
    let broken = config("one", backend.addr).replace(
        "direct_response = { body = \"one\" }",
        "direct_response = { status = 503, body = \"broken\" }",
    );
    let apply = |guard: pb::GuardOptions| pb::ApplyRequest {
        config: broken.clone(),
        format: pb::ConfigFormat::Toml as i32,
        options: None,
        guard: Some(guard),
    };
    // Gates are checked as in REST: a bake without a gate is refused, nothing changes.
    let err = client
        .apply(admin(apply(pb::GuardOptions {
            bake: "30s".into(),
            ..Default::default()
        })))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    assert!(err.message().contains("at least one gate"), "{err}");
    assert_eq!(body_of(&gateway, "/").await, "one");

    let from = gateway.stderr.len();
    let reply = client
        .apply(admin(apply(pb::GuardOptions {
            bake: "30s".into(),
            max_5xx_rate: Some(0.2),
            min_requests: Some(5),
            ..Default::default()
        })))
        .await
        .unwrap()
        .into_inner();
    let guard: Value = serde_json::from_str(&reply.guard_json).expect("guard JSON");
    assert_eq!(guard["state"], "baking", "{guard}");
    assert_eq!(guard["version"], json!(reply.version));

    // Traffic sees 503s until the guard restores the previous version.
    let deadline = std::time::Instant::now() + PATIENCE;
    while !gateway
        .stderr
        .snapshot()
        .iter()
        .skip(from)
        .any(|line| line.contains("guarded apply rolled back"))
    {
        assert!(std::time::Instant::now() < deadline, "no rollback");
        let _ = body_of(&gateway, "/").await;
    }
    assert_eq!(body_of(&gateway, "/").await, "one");
    let status = json(
        &client
            .status(admin(pb::StatusRequest {}))
            .await
            .unwrap()
            .into_inner(),
    );
    assert_eq!(status["guard"]["state"], "rolled_back", "{status}");
}
