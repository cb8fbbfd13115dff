//! Request policies against the real binary (SPEC POLICY-1..4): rate limits (429 +
//! Retry-After, keyed by address, header or identity, global and per route), L7 rules
//! (403, first match wins, edited through the admin API and `gatehouse ctl`, persisted),
//! JWT (HS256, RS256, ES256, EdDSA; JWKS file and URL with rotation) and basic auth (401 +
//! WWW-Authenticate), external authorization over HTTP (allow, deny, headers, both fail
//! modes with the service down and stalled), and the policy metrics.

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use http::{Response, StatusCode};
use ring::signature::{EcdsaKeyPair, Ed25519KeyPair, KeyPair, RsaKeyPair};
use serde_json::{json, Value};

use support::{echoed_header, full, http1_client, Backend, Gateway, PATIENCE};

async fn within<F: std::future::Future>(what: &str, future: F) -> F::Output {
    tokio::time::timeout(PATIENCE, future)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

struct Answer {
    status: StatusCode,
    headers: http::HeaderMap,
    text: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| panic!("{e}: {}", self.text))
    }

    fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .map(|v| v.to_str().unwrap_or("").to_string())
    }
}

async fn get(url: &str, headers: &[(&str, &str)]) -> Answer {
    let mut request = http1_client().get(url);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = within(url, request.send())
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let status = response.status();
    let headers = response.headers().clone();
    let text = within("body", response.text()).await.expect("body");
    Answer {
        status,
        headers,
        text,
    }
}

/// The value of a metric sample with exactly these labels (0 when absent).
async fn metric(gateway: &Gateway, name: &str, labels: &[(&str, &str)]) -> f64 {
    let text = get(&format!("http://{}/metrics", gateway.addr("admin")), &[])
        .await
        .text;
    let lines: Vec<String> = text.lines().map(String::from).collect();
    let scrape = prometheus_parse::Scrape::parse(lines.into_iter().map(Ok)).expect("parse");
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .filter(|s| {
            labels.len() == s.labels.len()
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(k) == Some(v.to_string()).as_deref())
        })
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Untyped(v) => v,
            _ => 0.0,
        })
        .sum()
}

/// The refusal body carries the same request id as the response header.
fn assert_request_id(answer: &Answer) {
    let header = answer.header("x-request-id").expect("x-request-id");
    assert_eq!(
        answer.json()["request_id"],
        header.as_str(),
        "{}",
        answer.text
    );
}

fn with_admin(extra: &str, backend: SocketAddr) -> String {
    format!(
        "[admin]\nbind = \"127.0.0.1:0\"\n\n{}",
        support::config_with_pool(&[backend], extra)
    )
}

// ---------------------------------------------------------------------------------------
// POLICY-1 rate limits
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_pass_the_burst_then_answer_429_with_retry_after() {
    let backend = Backend::echo().await;
    let gateway = Gateway::start(&with_admin(
        r#"
[http]
trusted_proxies = ["127.0.0.1/32"]

[[routes]]
name = "api"
pool = "app"
rate_limit = { rate = "1r/m", burst = 2 }
[routes.match]
path_prefix = "/api"

[[routes]]
name = "keyed"
pool = "app"
rate_limit = { rate = "1r/m", burst = 0, key = "header", header = "x-api-key" }
[routes.match]
path_prefix = "/keyed"

[[routes]]
name = "free"
pool = "app"
[routes.match]
path_prefix = "/free"
"#,
        backend.addr,
    ));
    let api = gateway.url("public", "/api/x");
    // burst + 1 pass at once (nginx `burst=2 nodelay`), then 429.
    for n in 0..3 {
        assert_eq!(get(&api, &[]).await.status, 200, "request {n}");
    }
    let refused = get(&api, &[]).await;
    assert_eq!(refused.status, 429, "{}", refused.text);
    assert_eq!(refused.json()["error"], "rate_limited");
    assert_request_id(&refused);
    let retry_after: u64 = refused
        .header("retry-after")
        .expect("Retry-After")
        .parse()
        .expect("seconds");
    assert!((1..=60).contains(&retry_after), "{retry_after}");
    // Another client address (a trusted X-Forwarded-For) has its own bucket.
    let other = [("x-forwarded-for", "198.51.100.20")];
    assert_eq!(get(&api, &other).await.status, 200);
    // A route without a limit is not limited.
    for _ in 0..5 {
        assert_eq!(get(&gateway.url("public", "/free"), &[]).await.status, 200);
    }

    // Keyed by header: each key one request; requests without it share the address.
    let keyed = gateway.url("public", "/keyed");
    assert_eq!(get(&keyed, &[("x-api-key", "a")]).await.status, 200);
    assert_eq!(get(&keyed, &[("x-api-key", "a")]).await.status, 429);
    assert_eq!(get(&keyed, &[("x-api-key", "b")]).await.status, 200);
    assert_eq!(get(&keyed, &[]).await.status, 200);
    assert_eq!(get(&keyed, &[]).await.status, 429);

    assert_eq!(
        metric(
            &gateway,
            "gatehouse_rate_limited_total",
            &[("route", "api")]
        )
        .await,
        1.0
    );
    assert_eq!(
        metric(
            &gateway,
            "gatehouse_rate_limited_total",
            &[("route", "keyed")]
        )
        .await,
        2.0
    );
    let line = gateway.stderr.wait_for(0, PATIENCE, |line| {
        line.contains("RATE_LIMIT client_ip=127.0.0.1 host=127.0.0.1 path=/api/x status=429")
    });
    assert!(line.contains("WARN"), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_global_rate_limit_covers_every_route_and_unmatched_requests() {
    let backend = Backend::echo().await;
    let gateway = Gateway::start(&with_admin(
        r#"
[http]
rate_limit = { rate = "1r/m", burst = 1 }

[[routes]]
name = "a"
pool = "app"
[routes.match]
path_prefix = "/a"
"#,
        backend.addr,
    ));
    assert_eq!(get(&gateway.url("public", "/a"), &[]).await.status, 200);
    assert_eq!(get(&gateway.url("public", "/none"), &[]).await.status, 404);
    assert_eq!(get(&gateway.url("public", "/a"), &[]).await.status, 429);
    assert_eq!(get(&gateway.url("public", "/none"), &[]).await.status, 429);
    assert_eq!(
        metric(&gateway, "gatehouse_rate_limited_total", &[("route", "a")]).await,
        1.0
    );
    assert_eq!(
        metric(
            &gateway,
            "gatehouse_rate_limited_total",
            &[("route", "none")]
        )
        .await,
        1.0
    );
}

// ---------------------------------------------------------------------------------------
// POLICY-2 L7 rules
// ---------------------------------------------------------------------------------------

const RULES: &str = r#"
[http]
trusted_proxies = ["127.0.0.1/32"]

[[routes]]
name = "site"
pool = "app"

[[routes.policies]]
name = "office"
action = "allow"
sources = ["192.0.2.0/24"]

[[routes.policies]]
name = "scanners"
user_agent = "SQLMAP"

[[routes.policies]]
name = "python"
user_agent_regex = "^python-requests/"

[[routes.policies]]
name = "need-key"
require_header = { name = "x-api-key" }

[[routes.policies]]
name = "no-debug"
header = { name = "x-debug", value = "1" }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn l7_policies_deny_with_403_first_match_wins_and_are_counted() {
    let backend = Backend::echo().await;
    let gateway = Gateway::start(&with_admin(RULES, backend.addr));
    let url = gateway.url("public", "/page");
    let key = ("x-api-key", "k");
    assert_eq!(get(&url, &[key]).await.status, 200);
    let cases: [(&[(&str, &str)], &str); 4] = [
        (&[key, ("user-agent", "Mozilla sqlmap/1.7")], "scanners"),
        (&[key, ("user-agent", "python-requests/2.31")], "python"),
        (&[], "need-key"),
        (&[key, ("x-debug", "1")], "no-debug"),
    ];
    for (headers, policy) in cases {
        let answer = get(&url, headers).await;
        assert_eq!(answer.status, 403, "{policy}: {}", answer.text);
        assert_eq!(answer.json()["error"], "policy_denied");
        assert!(answer.text.contains(policy), "{}", answer.text);
        assert_request_id(&answer);
    }
    // Near misses pass.
    assert_eq!(
        get(&url, &[key, ("user-agent", "my-python-requests/2")])
            .await
            .status,
        200
    );
    assert_eq!(get(&url, &[key, ("x-debug", "0")]).await.status, 200);
    // The office network is allowed before any deny rule is looked at.
    let office = [("x-forwarded-for", "192.0.2.44"), ("user-agent", "sqlmap")];
    assert_eq!(get(&url, &office).await.status, 200);

    for policy in ["scanners", "python", "need-key", "no-debug"] {
        let value = metric(
            &gateway,
            "gatehouse_policy_blocks_total",
            &[("route", "site"), ("policy", policy)],
        )
        .await;
        assert_eq!(value, 1.0, "{policy}");
    }
    assert_eq!(
        metric(
            &gateway,
            "gatehouse_policy_blocks_total",
            &[("route", "site"), ("policy", "office")]
        )
        .await,
        0.0
    );
}

async fn ctl(admin: &str, args: &[&str]) -> (bool, String, String) {
    let mut all = vec!["ctl", "--admin", admin];
    all.extend_from_slice(args);
    let output = support::run_to_exit(&all, &[]).await;
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

async fn admin_call(
    gateway: &Gateway,
    method: http::Method,
    path: &str,
    body: Option<Value>,
) -> Answer {
    let url = format!("http://{}{path}", gateway.addr("admin"));
    let mut request = http1_client().request(method, &url);
    if let Some(body) = body {
        request = request
            .header("content-type", "application/json")
            .body(body.to_string());
    }
    let response = within(&url, request.send()).await.expect("admin call");
    let status = response.status();
    let headers = response.headers().clone();
    let text = within("body", response.text()).await.expect("body");
    Answer {
        status,
        headers,
        text,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_are_edited_at_runtime_through_the_admin_api_and_ctl_and_persist() {
    let backend = Backend::echo().await;
    let store_dir = tempfile::tempdir().expect("tempdir");
    let db = store_dir.path().join("g.db");
    let config = format!(
        "[store]\npath = {:?}\nmode = \"store\"\n\n{}",
        db.display().to_string(),
        with_admin(
            "[[routes]]\nname = \"site\"\npool = \"app\"\n",
            backend.addr
        )
    );
    let gateway = Gateway::start(&config);
    let admin = format!("http://{}", gateway.addr("admin"));
    let url = gateway.url("public", "/");
    let bot = [("user-agent", "EvilBot/1.0")];
    assert_eq!(get(&url, &bot).await.status, 200);

    // ctl put from a TOML file.
    let file = gateway.dir.path().join("bots.toml");
    std::fs::write(&file, "user_agent = \"evilbot\"\n").unwrap();
    let (ok, out, err) = ctl(
        &admin,
        &[
            "policies",
            "put",
            "--route",
            "site",
            "bots",
            file.to_str().unwrap(),
        ],
    )
    .await;
    assert!(ok, "{err}");
    assert!(out.contains("route site: policy bots added"), "{out}");
    assert_eq!(get(&url, &bot).await.status, 403);

    // The REST API: put a second rule, list, get.
    let put = admin_call(
        &gateway,
        http::Method::PUT,
        "/routes/site/policies/need-key",
        Some(json!({"require_header": {"name": "x-api-key"}})),
    )
    .await;
    assert_eq!(put.status, 201, "{}", put.text);
    assert_eq!(get(&url, &[]).await.status, 403);
    assert_eq!(get(&url, &[("x-api-key", "1")]).await.status, 200);
    let list = admin_call(&gateway, http::Method::GET, "/routes/site/policies", None).await;
    assert_eq!(list.status, 200);
    let names: Vec<String> = list.json()["policies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["bots", "need-key"]);
    let one = admin_call(
        &gateway,
        http::Method::GET,
        "/routes/site/policies/bots",
        None,
    )
    .await;
    assert_eq!(one.json()["user_agent"], "evilbot");

    // A bad rule is refused with its field path, and nothing changes.
    let bad = admin_call(
        &gateway,
        http::Method::PUT,
        "/routes/site/policies/broken",
        Some(json!({"user_agent_regex": "(unclosed"})),
    )
    .await;
    assert_eq!(bad.status, 422, "{}", bad.text);
    assert!(
        bad.text.contains("routes[0].policies[2].user_agent_regex"),
        "{}",
        bad.text
    );
    let missing = admin_call(
        &gateway,
        http::Method::GET,
        "/routes/site/policies/nope",
        None,
    )
    .await;
    assert_eq!(missing.status, 404);
    let missing = admin_call(&gateway, http::Method::GET, "/routes/nope/policies", None).await;
    assert_eq!(missing.status, 404);

    // ctl list: a table, and --json.
    let (ok, out, err) = ctl(&admin, &["policies", "list", "--route", "site"]).await;
    assert!(ok, "{err}");
    assert!(
        out.contains("POLICY") && out.contains("CONDITIONS"),
        "{out}"
    );
    assert!(
        out.contains("bots") && out.contains("user_agent~evilbot"),
        "{out}"
    );
    assert!(
        out.contains("need-key") && out.contains("require x-api-key"),
        "{out}"
    );
    let (ok, out, err) = ctl(&admin, &["--json", "policies", "list", "--route", "site"]).await;
    assert!(ok, "{err}");
    let listed: Value = serde_json::from_str(&out).expect("json");
    assert_eq!(listed["policies"].as_array().unwrap().len(), 2);
    let (ok, out, err) = ctl(&admin, &["policies", "get", "--route", "site", "need-key"]).await;
    assert!(ok, "{err}");
    assert!(out.contains("x-api-key"), "{out}");

    // The audit log names the edits.
    let audit = admin_call(&gateway, http::Method::GET, "/audit", None).await;
    assert!(audit.text.contains("put_policy"), "{}", audit.text);

    // Persisted: a restart on the store runs the edited policies.
    drop(gateway);
    let gateway = Gateway::start(&config);
    let admin = format!("http://{}", gateway.addr("admin"));
    let url = gateway.url("public", "/");
    assert_eq!(get(&url, &[("x-api-key", "1")]).await.status, 200);
    assert_eq!(get(&url, &[("x-api-key", "1"), bot[0]]).await.status, 403);

    // Remove, then replace the whole list.
    let (ok, out, err) = ctl(&admin, &["policies", "remove", "--route", "site", "bots"]).await;
    assert!(ok, "{err}");
    assert!(out.contains("route site: policy bots removed"), "{out}");
    assert_eq!(get(&url, &[("x-api-key", "1"), bot[0]]).await.status, 200);
    let replaced = admin_call(
        &gateway,
        http::Method::PUT,
        "/routes/site/policies",
        Some(json!([{"name": "all", "action": "deny"}])),
    )
    .await;
    assert_eq!(replaced.status, 200, "{}", replaced.text);
    assert_eq!(get(&url, &[("x-api-key", "1")]).await.status, 403);
    let (ok, _, err) = ctl(&admin, &["policies", "remove", "--route", "site", "bots"]).await;
    assert!(!ok);
    assert!(err.contains("unknown_name (404)"), "{err}");
}

// ---------------------------------------------------------------------------------------
// POLICY-3 JWT and basic auth
// ---------------------------------------------------------------------------------------

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

enum Signer {
    Hs256(Vec<u8>),
    Rs256(RsaKeyPair),
    Es256(EcdsaKeyPair),
    EdDsa(Ed25519KeyPair),
}

impl Signer {
    fn alg(&self) -> &'static str {
        match self {
            Signer::Hs256(_) => "HS256",
            Signer::Rs256(_) => "RS256",
            Signer::Es256(_) => "ES256",
            Signer::EdDsa(_) => "EdDSA",
        }
    }

    fn sign(&self, kid: Option<&str>, claims: &Value) -> String {
        let mut header = json!({"alg": self.alg(), "typ": "JWT"});
        if let Some(kid) = kid {
            header["kid"] = json!(kid);
        }
        let message = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let rng = ring::rand::SystemRandom::new();
        let signature = match self {
            Signer::Hs256(secret) => {
                let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
                ring::hmac::sign(&key, message.as_bytes()).as_ref().to_vec()
            }
            Signer::Rs256(key) => {
                let mut out = vec![0; key.public().modulus_len()];
                key.sign(
                    &ring::signature::RSA_PKCS1_SHA256,
                    &rng,
                    message.as_bytes(),
                    &mut out,
                )
                .expect("rsa sign");
                out
            }
            Signer::Es256(key) => key
                .sign(&rng, message.as_bytes())
                .expect("ecdsa sign")
                .as_ref()
                .to_vec(),
            Signer::EdDsa(key) => key.sign(message.as_bytes()).as_ref().to_vec(),
        };
        format!("{message}.{}", b64(&signature))
    }

    /// The public JWK.
    fn jwk(&self, kid: &str) -> Value {
        match self {
            Signer::Hs256(secret) => json!({"kty": "oct", "kid": kid, "k": b64(secret)}),
            Signer::Rs256(key) => {
                let public = ring::signature::RsaPublicKeyComponents::<Vec<u8>>::from(key.public());
                json!({
                    "kty": "RSA", "kid": kid, "alg": "RS256", "use": "sig",
                    "n": b64(&public.n),
                    "e": b64(&public.e),
                })
            }
            Signer::Es256(key) => {
                let point = key.public_key().as_ref();
                json!({"kty": "EC", "kid": kid, "crv": "P-256",
                       "x": b64(&point[1..33]), "y": b64(&point[33..65])})
            }
            Signer::EdDsa(key) => {
                json!({"kty": "OKP", "kid": kid, "crv": "Ed25519", "x": b64(key.public_key().as_ref())})
            }
        }
    }
}

fn rsa_key() -> RsaKeyPair {
    let output = std::process::Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-outform",
            "DER",
        ])
        .output()
        .expect("run openssl genpkey");
    assert!(output.status.success(), "openssl genpkey failed");
    // `-outform DER` writes the PKCS#1 RSAPrivateKey.
    RsaKeyPair::from_der(&output.stdout).expect("rsa der")
}

fn ec_key() -> EcdsaKeyPair {
    let rng = ring::rand::SystemRandom::new();
    let alg = &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING;
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(alg, &rng).expect("ec key");
    EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).expect("ec parse")
}

fn ed_key() -> Ed25519KeyPair {
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).expect("ed key");
    Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).expect("ed parse")
}

const SECRET: &str = "a-shared-secret-of-32-bytes-long";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_with_all_four_algorithms_claims_and_failures() {
    let backend = Backend::echo().await;
    let rsa = Signer::Rs256(rsa_key());
    let ec = Signer::Es256(ec_key());
    let ed = Signer::EdDsa(ed_key());
    let hs = Signer::Hs256(SECRET.as_bytes().to_vec());
    let dir = tempfile::tempdir().unwrap();
    let jwks = dir.path().join("jwks.json");
    std::fs::write(
        &jwks,
        json!({"keys": [rsa.jwk("r1"), ec.jwk("e1"), ed.jwk("d1")]}).to_string(),
    )
    .unwrap();
    let gateway = Gateway::start(&with_admin(
        &format!(
            r#"
[[routes]]
name = "api"
pool = "app"
[routes.jwt]
secret = "{SECRET}"
jwks_file = {jwks:?}
issuer = "https://issuer.example"
audiences = ["api"]
leeway = "5s"
forward_claims = {{ sub = "x-user", scope = "x-scope" }}
"#,
            jwks = jwks.display().to_string()
        ),
        backend.addr,
    ));
    let url = gateway.url("public", "/r");
    let good = |extra: Value| {
        let mut claims = json!({
            "iss": "https://issuer.example", "aud": ["other", "api"], "sub": "alice",
            "scope": "read", "exp": now() + 300, "nbf": now() - 10,
        });
        for (k, v) in extra.as_object().unwrap() {
            claims[k] = v.clone();
        }
        claims
    };
    for (signer, kid) in [
        (&hs, None),
        (&rsa, Some("r1")),
        (&ec, Some("e1")),
        (&ed, Some("d1")),
    ] {
        let token = signer.sign(kid, &good(json!({})));
        let answer = get(
            &url,
            &[
                ("authorization", &format!("Bearer {token}")),
                ("x-user", "mallory"),
            ],
        )
        .await;
        assert_eq!(answer.status, 200, "{}: {}", signer.alg(), answer.text);
        let echoed = answer.json();
        assert_eq!(
            echoed_header(&echoed, "x-user"),
            ["alice"],
            "{}",
            signer.alg()
        );
        assert_eq!(echoed_header(&echoed, "x-scope"), ["read"]);
    }
    // Without a kid the matching key type is found too.
    let token = ec.sign(None, &good(json!({})));
    let bearer = format!("Bearer {token}");
    assert_eq!(get(&url, &[("authorization", &bearer)]).await.status, 200);

    let missing = get(&url, &[]).await;
    assert_eq!(missing.status, 401);
    assert_eq!(
        missing.header("www-authenticate").as_deref(),
        Some("Bearer realm=\"gatehouse\"")
    );
    assert_request_id(&missing);
    let other_ec = Signer::Es256(ec_key());
    let cases = [
        (
            rsa.sign(Some("r1"), &good(json!({"exp": now() - 60}))),
            "token expired",
        ),
        (
            ed.sign(Some("d1"), &good(json!({"nbf": now() + 60}))),
            "token not yet valid",
        ),
        (
            hs.sign(None, &good(json!({"iss": "https://evil"}))),
            "wrong issuer",
        ),
        (
            ec.sign(Some("e1"), &good(json!({"aud": "web"}))),
            "wrong audience",
        ),
        (
            other_ec.sign(Some("e1"), &good(json!({}))),
            "signature does not verify",
        ),
        (
            Signer::Hs256(b"another-secret-of-some-length".to_vec()).sign(None, &good(json!({}))),
            "signature does not verify",
        ),
        ("not.a.token".to_string(), "malformed"),
        // alg "none" (unsigned) is never accepted.
        (
            format!(
                "{}.{}.",
                b64(b"{\"alg\":\"none\"}"),
                b64(good(json!({})).to_string().as_bytes())
            ),
            "algorithm not accepted",
        ),
        // An HS256 token "signed" with a public key's bytes: HMAC uses only secrets.
        (
            Signer::Hs256(rsa.jwk("r1")["n"].as_str().unwrap().as_bytes().to_vec())
                .sign(Some("r1"), &good(json!({}))),
            "signature does not verify",
        ),
    ];
    for (token, reason) in cases {
        let answer = get(&url, &[("authorization", &format!("Bearer {token}"))]).await;
        assert_eq!(answer.status, 401, "{reason}");
        let challenge = answer.header("www-authenticate").unwrap_or_default();
        assert!(
            challenge.starts_with("Bearer realm=\"gatehouse\", error=\"invalid_token\""),
            "{challenge}"
        );
        assert!(challenge.contains(reason), "{reason}: {challenge}");
    }
    // Within the leeway an expired token still passes.
    let token = hs.sign(None, &good(json!({"exp": now() - 2})));
    let bearer = format!("Bearer {token}");
    assert_eq!(get(&url, &[("authorization", &bearer)]).await.status, 200);
    assert_eq!(
        metric(
            &gateway,
            "gatehouse_auth_failures_total",
            &[("route", "api"), ("scheme", "bearer")]
        )
        .await,
        10.0
    );
}

/// A JWKS endpoint served by a real hyper server; its document can be swapped.
async fn jwks_server(document: Arc<Mutex<String>>) -> Backend {
    Backend::start(Arc::new(move |_request| {
        let body = document.lock().unwrap().clone();
        Box::pin(async move {
            let mut response = Response::new(full(body));
            response
                .headers_mut()
                .insert("content-type", "application/json".parse().unwrap());
            response
        })
    }))
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_url_key_rotation_is_picked_up_after_a_refresh() {
    let backend = Backend::echo().await;
    let first = Signer::EdDsa(ed_key());
    let second = Signer::Es256(ec_key());
    let document = Arc::new(Mutex::new(json!({"keys": [first.jwk("k1")]}).to_string()));
    let server = jwks_server(document.clone()).await;
    let gateway = Gateway::start(&support::config_with_pool(
        &[backend.addr],
        &format!(
            r#"
[[routes]]
name = "api"
pool = "app"
[routes.jwt]
jwks_url = "http://{}/.well-known/jwks.json"
jwks_refresh = "1s"
require_exp = false
"#,
            server.addr
        ),
    ));
    let url = gateway.url("public", "/");
    let claims = json!({"sub": "u"});
    let old = format!("Bearer {}", first.sign(Some("k1"), &claims));
    let new = format!("Bearer {}", second.sign(Some("k2"), &claims));
    let until = |token: String, status: u16| {
        let url = url.clone();
        async move {
            let deadline = Instant::now() + PATIENCE;
            loop {
                let answer = get(&url, &[("authorization", &token)]).await;
                if answer.status == status {
                    return;
                }
                assert!(
                    Instant::now() < deadline,
                    "never got {status}: {}",
                    answer.text
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    // The first fetch happens in the background right after start.
    until(old.clone(), 200).await;
    assert_eq!(get(&url, &[("authorization", &new)]).await.status, 401);
    *document.lock().unwrap() = json!({"keys": [second.jwk("k2")]}).to_string();
    until(new.clone(), 200).await;
    assert_eq!(get(&url, &[("authorization", &old)]).await.status, 401);
    // A broken document keeps the keys that work.
    *document.lock().unwrap() = "{not json".into();
    let from = gateway.stderr.len();
    gateway
        .stderr
        .wait_for(from, PATIENCE, |line| line.contains("JWKS refresh failed"));
    assert_eq!(get(&url, &[("authorization", &new)]).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_auth_with_bcrypt_and_a_rate_limit_per_user() {
    let backend = Backend::echo().await;
    let alice = bcrypt::hash("wonderland", 4).unwrap();
    let bob = bcrypt::hash("builder", 4).unwrap();
    let gateway = Gateway::start(&with_admin(
        &format!(
            r#"
[[routes]]
name = "private"
pool = "app"
rate_limit = {{ rate = "1r/m", burst = 1, key = "identity" }}
[routes.basic_auth]
realm = "staff only"
forward_user_header = "x-remote-user"
users = {{ alice = "{alice}", bob = "{bob}" }}
"#
        ),
        backend.addr,
    ));
    let url = gateway.url("public", "/");
    let basic = |user: &str, password: &str| {
        format!("Basic {}", STANDARD.encode(format!("{user}:{password}")))
    };
    let answer = get(&url, &[]).await;
    assert_eq!(answer.status, 401);
    assert_eq!(
        answer.header("www-authenticate").as_deref(),
        Some("Basic realm=\"staff only\", charset=\"UTF-8\"")
    );
    for (user, password) in [("alice", "wrong"), ("carol", "wonderland")] {
        let answer = get(&url, &[("authorization", &basic(user, password))]).await;
        assert_eq!(answer.status, 401, "{user}");
    }
    let alice_auth = basic("alice", "wonderland");
    let answer = get(
        &url,
        &[("authorization", &alice_auth), ("x-remote-user", "root")],
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    assert_eq!(echoed_header(&answer.json(), "x-remote-user"), ["alice"]);
    // The limit follows the user, not the address: alice's burst is spent, bob's is not.
    assert_eq!(
        get(&url, &[("authorization", &alice_auth)]).await.status,
        200
    );
    assert_eq!(
        get(&url, &[("authorization", &alice_auth)]).await.status,
        429
    );
    let bob_auth = basic("bob", "builder");
    assert_eq!(get(&url, &[("authorization", &bob_auth)]).await.status, 200);
    assert_eq!(
        metric(
            &gateway,
            "gatehouse_auth_failures_total",
            &[("route", "private"), ("scheme", "basic")]
        )
        .await,
        3.0
    );
}

// ---------------------------------------------------------------------------------------
// POLICY-4 external authorization
// ---------------------------------------------------------------------------------------

/// The authorization service: `Bearer good` → 200 with `x-user`; `Bearer bad` → 403 with
/// a body; `Bearer boom` → 500; anything else → 401. Records what it was asked.
async fn authz_service(seen: Arc<Mutex<Vec<HashMap<String, String>>>>) -> Backend {
    Backend::start(Arc::new(move |request| {
        let headers: HashMap<String, String> = request
            .headers()
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
            .collect();
        let auth = headers.get("authorization").cloned().unwrap_or_default();
        seen.lock().unwrap().push(headers);
        Box::pin(async move {
            let (status, body, user) = match auth.as_str() {
                "Bearer good" => (200, "", Some("alice")),
                "Bearer bad" => (403, "{\"denied\":\"by policy\"}", None),
                "Bearer boom" => (500, "oops", None),
                _ => (401, "login first", None),
            };
            let mut response = Response::new(full(body));
            *response.status_mut() = StatusCode::from_u16(status).unwrap();
            if let Some(user) = user {
                response
                    .headers_mut()
                    .insert("x-user", user.parse().unwrap());
                response
                    .headers_mut()
                    .insert("x-internal", "secret".parse().unwrap());
            }
            if status == 401 {
                response
                    .headers_mut()
                    .insert("www-authenticate", "Bearer realm=\"sso\"".parse().unwrap());
            }
            response
        })
    }))
    .await
}

/// A TCP server that accepts and never answers.
async fn stalled_server() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    (addr, task)
}

/// An address where nothing listens (connection refused).
async fn refused_address() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ext_authz_allows_denies_adds_headers_and_honours_both_fail_modes() {
    let backend = Backend::echo().await;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let service = authz_service(seen.clone()).await;
    let (stalled, _stall_task) = stalled_server().await;
    let refused = refused_address().await;
    let route = |name: &str, url: String, mode: &str| {
        format!(
            r#"
[[routes]]
name = "{name}"
pool = "app"
[routes.match]
path_prefix = "/{name}"
[routes.ext_authz]
url = "{url}"
timeout = "300ms"
fail_mode = "{mode}"
upstream_headers = ["x-user"]
"#
        )
    };
    let config = [
        route("main", format!("http://{}/check", service.addr), "closed"),
        route("down-open", format!("http://{refused}/check"), "open"),
        route("down-closed", format!("http://{refused}/check"), "closed"),
        route("stall-open", format!("http://{stalled}/check"), "open"),
        route("stall-closed", format!("http://{stalled}/check"), "closed"),
    ]
    .concat();
    let gateway = Gateway::start(&with_admin(&config, backend.addr));
    let url = gateway.url("public", "/main/items?page=2");

    // Allow: the service's x-user replaces the client's; x-internal is not copied.
    let answer = get(
        &url,
        &[("authorization", "Bearer good"), ("x-user", "mallory")],
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    let echoed = answer.json();
    assert_eq!(echoed_header(&echoed, "x-user"), ["alice"]);
    assert!(echoed_header(&echoed, "x-internal").is_empty());
    let asked = seen.lock().unwrap().last().cloned().unwrap();
    assert_eq!(asked["x-forwarded-method"], "GET");
    assert_eq!(asked["x-forwarded-uri"], "/main/items?page=2");
    assert_eq!(asked["x-forwarded-for"], "127.0.0.1");
    assert!(asked.contains_key("x-request-id"));
    assert_eq!(asked["authorization"], "Bearer good");

    // Deny: the service's status and body reach the client, with the request id.
    let answer = get(&url, &[("authorization", "Bearer bad")]).await;
    assert_eq!(answer.status, 403);
    assert_eq!(answer.text, "{\"denied\":\"by policy\"}");
    assert!(answer.header("x-request-id").is_some());
    let answer = get(&url, &[]).await;
    assert_eq!(answer.status, 401);
    assert_eq!(answer.text, "login first");
    assert_eq!(
        answer.header("www-authenticate").as_deref(),
        Some("Bearer realm=\"sso\"")
    );
    // A 5xx from the service is a failure: fail_mode closed → 503.
    let answer = get(&url, &[("authorization", "Bearer boom")]).await;
    assert_eq!(answer.status, 503);
    assert_eq!(answer.json()["error"], "ext_authz_unavailable");
    assert_request_id(&answer);

    // Service down (connection refused) and stalled (timeout), in both modes.
    for (path, status) in [
        ("/down-open", 200),
        ("/down-closed", 503),
        ("/stall-open", 200),
        ("/stall-closed", 503),
    ] {
        let started = Instant::now();
        let answer = get(&gateway.url("public", path), &[]).await;
        assert_eq!(answer.status, status, "{path}: {}", answer.text);
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{path} took too long"
        );
    }
    assert_eq!(
        backend.count(),
        3,
        "allowed requests only reach the backend"
    );
    for (route, result, value) in [
        ("main", "allowed", 1.0),
        ("main", "denied", 2.0),
        ("main", "failed_closed", 1.0),
        ("down-open", "failed_open", 1.0),
        ("stall-closed", "failed_closed", 1.0),
    ] {
        assert_eq!(
            metric(
                &gateway,
                "gatehouse_ext_authz_total",
                &[("route", route), ("result", result)]
            )
            .await,
            value,
            "{route} {result}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// Config validation
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_policy_settings_are_reported_with_field_paths() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(
        &file,
        r#"
[[listeners]]
name = "public"
bind = "127.0.0.1:0"

[http]
rate_limit = { rate = "10r/h" }

[[routes]]
direct_response = { body = "x" }
rate_limit = { rate = "5r/s", key = "header" }

[[routes.policies]]
name = "a"
user_agent_regex = "(("

[[routes.policies]]
name = "a"
header = { name = "bad header" }

[routes.jwt]
algorithms = ["none"]
secret = "short"

[routes.ext_authz]
url = "ftp://authz"
"#,
    )
    .unwrap();
    let output = support::run_to_exit(&["validate", file.to_str().unwrap()], &[]).await;
    assert!(!output.status.success());
    let text = String::from_utf8_lossy(&output.stderr).to_string()
        + &String::from_utf8_lossy(&output.stdout);
    for path in [
        "http.rate_limit.rate",
        "routes[0].rate_limit.header",
        "routes[0].policies[0].user_agent_regex",
        "routes[0].policies[1].name",
        "routes[0].policies[1].header.name",
        "routes[0].jwt.algorithms[0]",
        "routes[0].jwt.secret",
        "routes[0].ext_authz.url",
    ] {
        assert!(text.contains(path), "{path} missing in:\n{text}");
    }
}
