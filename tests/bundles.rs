//! Signed config bundles and pull mode (SPEC CTRL-8) against the real binary: keys and
//! bundles made by `gatehouse bundle`, applied through the admin API and `gatehouse ctl`,
//! and fetched by pull mode from a real hyper server. Every refusal (unsigned, tampered,
//! unknown key, replay, server down) leaves the running config unchanged.

mod support;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{Response, StatusCode};
use serde_json::Value;

use support::{full, http1_client, Backend, Gateway, PATIENCE};

#[allow(clippy::all)]
mod pb {
    include!(concat!(env!("OUT_DIR"), "/client/gatehouse.admin.v1.rs"));
}

/// Runs `gatehouse ARGS`; returns (success, stdout, stderr).
async fn run(args: &[&str]) -> (bool, String, String) {
    let output = support::run_to_exit(args, &[]).await;
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// `gatehouse bundle keygen`: the secret key path and the public key text.
async fn keygen(dir: &Path, name: &str) -> (PathBuf, String) {
    let prefix = dir.join(name);
    let (ok, out, err) = run(&["bundle", "keygen", "--out", prefix.to_str().unwrap()]).await;
    assert!(ok, "{err}");
    assert!(out.contains("public key"), "{out}");
    let public = std::fs::read_to_string(prefix.with_extension("pub")).unwrap();
    (prefix.with_extension("key"), public.trim().to_string())
}

/// The data-plane part of a config: listener `public` answering `body`.
fn data_config(body: &str) -> String {
    format!(
        "[[listeners]]\nname = \"public\"\nbind = \"127.0.0.1:0\"\n\n[[routes]]\ndirect_response = {{ body = \"{body}\" }}\n"
    )
}

/// `gatehouse bundle sign` of `data_config(body)`; `key` None makes an unsigned bundle.
async fn sign(dir: &Path, key: Option<&Path>, version: i64, body: &str) -> String {
    let config = dir.join(format!("config-{version}-{body}.toml"));
    std::fs::write(&config, data_config(body)).unwrap();
    let output = dir.join(format!("bundle-{version}-{body}.json"));
    let version = version.to_string();
    let mut args = vec![
        "bundle",
        "sign",
        "--config",
        config.to_str().unwrap(),
        "--version",
        &version,
        "--author",
        "alice",
        "-o",
        output.to_str().unwrap(),
    ];
    match key {
        Some(key) => args.extend(["--key", key.to_str().unwrap()]),
        None => args.push("--unsigned"),
    }
    let (ok, _, err) = run(&args).await;
    assert!(ok, "{err}");
    std::fs::read_to_string(output).unwrap()
}

fn gateway_config(public_key: &str, extra: &str) -> String {
    format!(
        "[admin]\nbind = \"127.0.0.1:0\"\n\n[bundles]\nrequire_signature = true\ntrusted_keys = [{{ name = \"release\", public_key = \"{public_key}\" }}]\n{extra}\n{}",
        data_config("one")
    )
}

async fn body_of(gateway: &Gateway) -> String {
    http1_client()
        .get(gateway.url("public", "/"))
        .send()
        .await
        .expect("data-plane request")
        .text()
        .await
        .expect("body")
}

async fn admin_json(gateway: &Gateway, path: &str) -> Value {
    http1_client()
        .get(format!("http://{}{path}", gateway.addr("admin")))
        .send()
        .await
        .expect("admin request")
        .json()
        .await
        .expect("admin JSON")
}

async fn post_bundle(gateway: &Gateway, bundle: &str) -> (StatusCode, Value) {
    let response = http1_client()
        .post(format!("http://{}/config/bundle", gateway.addr("admin")))
        .header("content-type", "application/json")
        .body(bundle.to_string())
        .send()
        .await
        .expect("admin request");
    let status = response.status();
    (status, response.json().await.expect("admin JSON"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_bundles_apply_and_every_refusal_changes_nothing() {
    let keys = tempfile::tempdir().unwrap();
    let (release, public) = keygen(keys.path(), "release").await;
    let (other, _) = keygen(keys.path(), "other").await;
    let gateway = Gateway::start(&gateway_config(&public, ""));
    assert_eq!(body_of(&gateway).await, "one");

    // `bundle verify` checks against the given public keys.
    let five = sign(keys.path(), Some(&release), 5, "two").await;
    let five_path = keys.path().join("bundle-5-two.json");
    let (ok, out, err) = run(&[
        "bundle",
        "verify",
        five_path.to_str().unwrap(),
        "--pub",
        keys.path().join("release.pub").to_str().unwrap(),
    ])
    .await;
    assert!(
        ok && out.contains("ok: bundle version 5 by alice"),
        "{out}{err}"
    );
    let (ok, _, err) = run(&[
        "bundle",
        "verify",
        five_path.to_str().unwrap(),
        "--pub",
        keys.path().join("other.pub").to_str().unwrap(),
    ])
    .await;
    assert!(!ok && err.contains("not in bundles.trusted_keys"), "{err}");

    // A good bundle applies and traffic follows.
    let (status, body) = post_bundle(&gateway, &five).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["changed"], true);
    let applied_version = body["version"].as_i64().unwrap();
    assert_eq!(body_of(&gateway).await, "two");
    let audit = admin_json(&gateway, "/audit?limit=1").await;
    assert_eq!(audit["records"][0]["action"], "apply_bundle");
    let message = audit["records"][0]["message"].as_str().unwrap();
    assert!(
        message.starts_with("bundle 5 by alice") && message.ends_with("signed by release"),
        "{message}"
    );
    let status_doc = admin_json(&gateway, "/status").await;
    assert_eq!(status_doc["bundles"]["require_signature"], true);

    // Refusals: each a precise 4xx, none changes the running config.
    let six = sign(keys.path(), Some(&release), 6, "three").await;
    let tampered = six.replace("three", "evil");
    let cases = [
        (
            five.clone(),
            StatusCode::CONFLICT,
            "bundle_replay",
            "replay",
        ),
        (
            sign(keys.path(), Some(&release), 4, "old").await,
            StatusCode::CONFLICT,
            "bundle_replay",
            "not newer than the last applied bundle version 5",
        ),
        (
            tampered,
            StatusCode::UNPROCESSABLE_ENTITY,
            "bundle_bad_signature",
            "does not verify",
        ),
        (
            sign(keys.path(), Some(&other), 7, "other").await,
            StatusCode::UNPROCESSABLE_ENTITY,
            "bundle_unknown_key",
            "not in bundles.trusted_keys",
        ),
        (
            sign(keys.path(), None, 8, "unsigned").await,
            StatusCode::UNPROCESSABLE_ENTITY,
            "bundle_unsigned",
            "unsigned",
        ),
        (
            "{\"format\": \"gatehouse-bundle-v1\"}".to_string(),
            StatusCode::BAD_REQUEST,
            "invalid_bundle",
            "missing field",
        ),
    ];
    for (bundle, expected, code, text) in cases {
        let (status, body) = post_bundle(&gateway, &bundle).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (expected, Some(code)),
            "{body}"
        );
        assert!(body["message"].as_str().unwrap().contains(text), "{body}");
        let current = admin_json(&gateway, "/config").await;
        assert_eq!(current["version"].as_i64(), Some(applied_version));
        assert_eq!(body_of(&gateway).await, "two");
    }

    // `gatehouse ctl apply --bundle` applies the next one.
    let admin = format!("http://{}", gateway.addr("admin"));
    let six_path = keys.path().join("bundle-6-three.json");
    let (ok, out, err) = run(&[
        "ctl",
        "--admin",
        &admin,
        "apply",
        "--bundle",
        six_path.to_str().unwrap(),
    ])
    .await;
    assert!(ok, "{err}");
    assert!(out.contains("bundle applied"), "{out}");
    assert_eq!(body_of(&gateway).await, "three");
    let (ok, _, err) = run(&[
        "ctl",
        "--admin",
        &admin,
        "apply",
        "--bundle",
        six_path.to_str().unwrap(),
    ])
    .await;
    assert!(!ok && err.contains("replay"), "{err}");

    // gRPC ApplyBundle: the same checks, as gRPC codes.
    let channel = tonic::transport::Channel::from_shared(admin.clone())
        .unwrap()
        .connect()
        .await
        .expect("gRPC channel");
    let mut client = pb::admin_client::AdminClient::new(channel);
    let request = |bundle: String| pb::BundleRequest {
        bundle_json: bundle,
        options: None,
    };
    let seven = sign(keys.path(), Some(&release), 7, "four").await;
    let reply = client
        .apply_bundle(request(seven.clone()))
        .await
        .unwrap()
        .into_inner();
    assert!(reply.changed);
    assert_eq!(body_of(&gateway).await, "four");
    let err = client.apply_bundle(request(seven)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err}");
    assert!(err.message().contains("replay"), "{err}");
    let eight = sign(keys.path(), Some(&release), 8, "five").await;
    let err = client
        .apply_bundle(request(eight.replace("five", "evil")))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
    assert!(err.message().contains("does not verify"), "{err}");
    assert_eq!(body_of(&gateway).await, "four");
}

/// What the bundle server answers: the current bundle text.
type Served = Arc<Mutex<String>>;

async fn bundle_server(served: Served) -> Backend {
    Backend::start(Arc::new(move |_request| {
        let text = served.lock().unwrap().clone();
        Box::pin(async move {
            let mut response = Response::new(full(text));
            response.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            );
            response
        })
    }))
    .await
}

/// Polls `/status` until pull mode has made a check after `after` checks and returns the
/// pull state.
async fn next_check(gateway: &Gateway, after: u64) -> Value {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let pull = admin_json(gateway, "/status").await["pull"].clone();
        if pull["checks"].as_u64().unwrap_or(0) > after {
            return pull;
        }
        assert!(
            Instant::now() < deadline,
            "no pull check after {after}: {pull}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_mode_applies_new_signed_bundles_and_refuses_the_rest() {
    let keys = tempfile::tempdir().unwrap();
    let (release, public) = keygen(keys.path(), "release").await;
    let five = sign(keys.path(), Some(&release), 5, "two").await;
    let served: Served = Arc::new(Mutex::new(five.clone()));
    let server = bundle_server(served.clone()).await;
    let pull = format!(
        "[pull]\nurl = \"http://{}/bundles/latest.json\"\ninterval = \"1s\"\ntimeout = \"2s\"\n",
        server.addr
    );
    let gateway = Gateway::start(&gateway_config(&public, &pull));

    // The first check applies bundle 5.
    let state = next_check(&gateway, 0).await;
    assert_eq!(state["last_applied_version"], 5, "{state}");
    assert_eq!(state["last_error"], Value::Null, "{state}");
    assert_eq!(body_of(&gateway).await, "two");
    let version = admin_json(&gateway, "/config").await["version"].clone();
    let audit = admin_json(&gateway, "/audit?limit=1").await;
    assert_eq!(audit["records"][0]["actor"], "pull");

    // The same bundle again is "up to date", not an error.
    let checks = state["checks"].as_u64().unwrap();
    let state = next_check(&gateway, checks).await;
    assert_eq!(state["last_error"], Value::Null, "{state}");

    // Tampered, replayed, unsigned: refused, reported, nothing changes.
    let six = sign(keys.path(), Some(&release), 6, "three").await;
    let refused = [
        (six.replace("three", "evil"), "does not verify"),
        (sign(keys.path(), Some(&release), 4, "old").await, "replay"),
        (sign(keys.path(), None, 9, "unsigned").await, "unsigned"),
    ];
    for (bundle, error) in refused {
        *served.lock().unwrap() = bundle;
        let mut checks = admin_json(&gateway, "/status").await["pull"]["checks"]
            .as_u64()
            .unwrap();
        // A check already under way may have fetched the previous bundle: wait for one
        // that started after the swap.
        let state = loop {
            let state = next_check(&gateway, checks + 1).await;
            if state["last_error"]
                .as_str()
                .is_some_and(|e| e.contains(error))
            {
                break state;
            }
            checks = state["checks"].as_u64().unwrap();
            assert!(checks < 100, "{state}");
        };
        assert_eq!(state["last_applied_version"], 5, "{state}");
        assert_eq!(admin_json(&gateway, "/config").await["version"], version);
        assert_eq!(body_of(&gateway).await, "two");
    }

    // A new signed version is applied and traffic follows it.
    *served.lock().unwrap() = six;
    let deadline = Instant::now() + PATIENCE;
    while admin_json(&gateway, "/status").await["pull"]["last_applied_version"] != 6 {
        assert!(Instant::now() < deadline, "bundle 6 not applied");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(body_of(&gateway).await, "three");
    let version = admin_json(&gateway, "/config").await["version"].clone();

    // Server down: the error is reported and the config stays.
    drop(server);
    let mut checks = admin_json(&gateway, "/status").await["pull"]["checks"]
        .as_u64()
        .unwrap();
    let state = loop {
        let state = next_check(&gateway, checks).await;
        if state["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("cannot connect"))
        {
            break state;
        }
        checks = state["checks"].as_u64().unwrap();
        assert!(checks < 100, "{state}");
    };
    assert_eq!(state["last_applied_version"], 6, "{state}");
    assert!(state["failures"].as_u64().unwrap() >= 4, "{state}");
    assert_eq!(admin_json(&gateway, "/config").await["version"], version);
    assert_eq!(body_of(&gateway).await, "three");

    // `ctl status` shows the same.
    let admin = format!("http://{}", gateway.addr("admin"));
    let (ok, out, err) = run(&["ctl", "--admin", &admin, "status"]).await;
    assert!(ok, "{err}");
    assert!(out.contains("last applied bundle 6"), "{out}");
    assert!(
        out.contains("pull http://") && out.contains("last error: cannot connect"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_applied_bundle_version_survives_a_restart() {
    let keys = tempfile::tempdir().unwrap();
    let (release, public) = keygen(keys.path(), "release").await;
    let store = keys.path().join("gatehouse.db");
    let text = gateway_config(
        &public,
        &format!(
            "[store]\npath = {:?}\nmode = \"store\"\n",
            store.display().to_string()
        ),
    );
    let five = sign(keys.path(), Some(&release), 5, "two").await;
    let gateway = Gateway::start(&text);
    let (status, body) = post_bundle(&gateway, &five).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    drop(gateway);

    // Store mode: bundle 5's config runs again, and bundle 5 cannot be applied twice.
    let gateway = Gateway::start(&text);
    assert_eq!(body_of(&gateway).await, "two");
    assert_eq!(
        admin_json(&gateway, "/status").await["bundles"]["last_applied_version"],
        5
    );
    let (status, body) = post_bundle(&gateway, &five).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    let six = sign(keys.path(), Some(&release), 6, "three").await;
    let (status, body) = post_bundle(&gateway, &six).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body_of(&gateway).await, "three");
}

/// An HTTPS server (certificate from `pair`) answering every request with `text`.
async fn https_bundle_server(
    pair: &support::tls::Pair,
    text: String,
) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    use rustls_pki_types::pem::PemObject;
    let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(pair.key.as_bytes()).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(support::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![pair.der()], key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let (acceptor, text) = (acceptor.clone(), text.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = hyper::service::service_fn(move |_request| {
                    let text = text.clone();
                    async move { Ok::<_, std::convert::Infallible>(Response::new(full(text))) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    (addr, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_over_https_verifies_the_server_with_pull_ca() {
    let keys = tempfile::tempdir().unwrap();
    let (release, public) = keygen(keys.path(), "release").await;
    let five = sign(keys.path(), Some(&release), 5, "two").await;
    let ca = support::tls::Ca::new("Config CA");
    let ca_pem = ca.write(keys.path(), "config-ca");
    let (addr, server) = https_bundle_server(&ca.server(&["127.0.0.1"]), five).await;

    // A CA that did not issue the server's certificate: a TLS error, nothing applied.
    let stranger = support::tls::Ca::new("Other CA");
    let stranger_pem = stranger.write(keys.path(), "other-ca");
    let pull = |ca: &Path| {
        format!(
            "[pull]\nurl = \"https://127.0.0.1:{}/latest.json\"\ninterval = \"1s\"\nca = {:?}\n",
            addr.port(),
            ca.display().to_string()
        )
    };
    let gateway = Gateway::start(&gateway_config(&public, &pull(&stranger_pem)));
    let state = next_check(&gateway, 0).await;
    assert!(
        state["last_error"].as_str().unwrap().starts_with("TLS:"),
        "{state}"
    );
    assert_eq!(state["last_applied_version"], Value::Null, "{state}");
    assert_eq!(body_of(&gateway).await, "one");
    drop(gateway);

    // The right CA: bundle 5 applies.
    let gateway = Gateway::start(&gateway_config(&public, &pull(&ca_pem)));
    let state = next_check(&gateway, 0).await;
    assert_eq!(state["last_applied_version"], 5, "{state}");
    assert_eq!(body_of(&gateway).await, "two");
    server.abort();
}
