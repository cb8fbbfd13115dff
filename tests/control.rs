//! The control plane against the real binary: the SQLite store (CTRL-3), the REST admin
//! API on its own listener (CTRL-4, OPS-4), bearer tokens (CTRL-5, REL-6), crash
//! consistency, and zero failed requests while configs change under load.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use http::{Response, StatusCode};
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};

use support::{full, http1_client, Backend, Gateway, PATIENCE};

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

async fn within<F: std::future::Future>(what: &str, future: F) -> F::Output {
    tokio::time::timeout(PATIENCE, future)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// An admin listener on port 0, a data listener `public` answering `body` on every path,
/// and `extra` (whole tables such as `[store]`) first.
fn config(body: &str, extra: &str) -> String {
    format!(
        "{extra}\n[admin]\nbind = \"127.0.0.1:0\"\n\n[[listeners]]\nname = \"public\"\nbind = \"127.0.0.1:0\"\nmax_connections = 50\n\n[[routes]]\ndirect_response = {{ body = \"{body}\" }}\n"
    )
}

fn store_table(path: &Path, mode: &str) -> String {
    format!(
        "[store]\npath = {:?}\nmode = \"{mode}\"\n",
        path.display().to_string()
    )
}

struct Reply {
    status: StatusCode,
    headers: http::HeaderMap,
    body: Value,
}

/// A client for the admin API of one gateway.
struct Admin {
    base: String,
    client: reqwest::Client,
    token: Option<String>,
}

impl Admin {
    fn of(gateway: &Gateway) -> Admin {
        Admin {
            base: format!("http://{}", gateway.addr("admin")),
            client: http1_client(),
            token: None,
        }
    }

    fn with_token(gateway: &Gateway, token: &str) -> Admin {
        Admin {
            token: Some(token.to_string()),
            ..Admin::of(gateway)
        }
    }

    async fn call(
        &self,
        method: http::Method,
        path: &str,
        body: Option<(&str, String)>,
        headers: &[(&str, &str)],
    ) -> Reply {
        self.try_call(method.clone(), path, body, headers)
            .await
            .unwrap_or_else(|err| panic!("{method} {path}: {err}"))
    }

    /// Like `call`, but a transport error (the gateway is gone) is returned, not a panic.
    async fn try_call(
        &self,
        method: http::Method,
        path: &str,
        body: Option<(&str, String)>,
        headers: &[(&str, &str)],
    ) -> Result<Reply, reqwest::Error> {
        let mut request = self
            .client
            .request(method.clone(), format!("{}{path}", self.base));
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        if let Some((content_type, body)) = body {
            request = request.header("content-type", content_type).body(body);
        }
        let response = within(path, request.send()).await?;
        let status = response.status();
        let headers = response.headers().clone();
        let text = within("admin body", response.text()).await?;
        let body = serde_json::from_str(&text)
            .unwrap_or_else(|err| panic!("{method} {path}: not JSON ({err}): {text}"));
        Ok(Reply {
            status,
            headers,
            body,
        })
    }

    async fn get(&self, path: &str) -> Reply {
        self.call(http::Method::GET, path, None, &[]).await
    }

    async fn put_toml(&self, text: String, headers: &[(&str, &str)]) -> Reply {
        self.call(
            http::Method::PUT,
            "/config",
            Some(("application/toml", text)),
            headers,
        )
        .await
    }

    async fn post(&self, path: &str, body: Option<(&str, String)>) -> Reply {
        self.call(http::Method::POST, path, body, &[]).await
    }

    async fn version(&self) -> i64 {
        let reply = self.get("/config").await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
        reply.body["version"].as_i64().expect("version")
    }

    async fn version_count(&self) -> usize {
        let reply = self.get("/config/versions?limit=1000").await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
        reply.body["versions"].as_array().expect("versions").len()
    }
}

/// GET through the data plane; returns status and body.
async fn data_get(gateway: &Gateway, path: &str) -> (StatusCode, String) {
    let url = gateway.url("public", path);
    let response = within(&url, http1_client().get(&url).send())
        .await
        .unwrap_or_else(|err| panic!("GET {url}: {err}"));
    let status = response.status();
    (status, within("body", response.text()).await.expect("body"))
}

fn open_store(path: &Path) -> rusqlite::Connection {
    rusqlite::Connection::open(path).expect("open the store")
}

// ---------------------------------------------------------------------------------------
// Store: first start, precedence between file and store (must-show 1)
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_start_creates_the_store_next_to_the_config_and_seeds_it_from_the_file() {
    let gateway = Gateway::start(&config("one", ""));
    let admin = Admin::of(&gateway);
    let db = gateway.dir.path().join("gatehouse.db");
    assert!(db.exists(), "no store at {}", db.display());

    let reply = admin.get("/config").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.body["version"], 1);
    assert_eq!(reply.body["author"], "file");
    assert_eq!(reply.headers["etag"], "\"1\"");
    assert_eq!(
        reply.body["config"]["routes"][0]["direct_response"]["body"],
        "one"
    );

    let conn = open_store(&db);
    let schema: i64 = conn
        .query_row("SELECT version FROM schema_version", [], |row| row.get(0))
        .unwrap();
    assert_eq!(schema, gatehouse::control::store::SCHEMA_VERSION);
    let (hash, stored): (String, String) = conn
        .query_row(
            "SELECT hash, config FROM config_versions WHERE id = 1",
            [],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )
        .unwrap();
    assert_eq!(hash, gatehouse::control::sha256_hex(stored.as_bytes()));
    assert_eq!(reply.body["hash"], hash);
    let (action, actor): (String, String) = conn
        .query_row("SELECT action, actor FROM audit_log", [], |row| {
            Ok((row.get(0)?, row.get(1)?))
        })
        .unwrap();
    assert_eq!((action.as_str(), actor.as_str()), ("seed", "file"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_mode_the_file_wins_at_start_and_sighup_stores_it_as_a_new_version() {
    let store_dir = tempfile::tempdir().unwrap();
    let db = store_dir.path().join("g.db");
    let store = store_table(&db, "file");
    let gateway = Gateway::start(&config("file-1", &store));
    let admin = Admin::of(&gateway);

    // An API change becomes version 2 and runs.
    let reply = admin.put_toml(config("api-2", &store), &[]).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert_eq!(reply.body["version"], 2);
    assert_eq!(data_get(&gateway, "/").await.1, "api-2");

    // SIGHUP re-reads the file: version 3.
    let line = gateway.reload_with(&config("file-3", &store));
    assert!(line.contains("reload succeeded"), "{line}");
    assert_eq!(data_get(&gateway, "/").await.1, "file-3");
    assert_eq!(admin.version().await, 3);
    let audit = admin.get("/audit").await.body;
    assert_eq!(audit["records"][0]["action"], "reload");
    assert_eq!(audit["records"][0]["actor"], "file");

    // SIGHUP with an unchanged file writes nothing.
    let line = gateway.reload_with(&config("file-3", &store));
    assert!(line.contains("changed=false"), "{line}");
    assert_eq!(admin.version_count().await, 3);

    // An API change, then a restart: in file mode the file wins, as a new version.
    assert_eq!(
        admin.put_toml(config("api-4", &store), &[]).await.status,
        StatusCode::OK
    );
    drop(gateway);
    let gateway = Gateway::start(&config("file-3", &store));
    let admin = Admin::of(&gateway);
    assert_eq!(data_get(&gateway, "/").await.1, "file-3");
    let reply = admin.get("/config").await;
    assert_eq!(reply.body["version"], 5);
    assert_eq!(reply.body["author"], "file");
    assert!(gateway
        .stderr
        .snapshot()
        .iter()
        .any(|line| line.contains("the config file replaces the newest stored version")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_mode_the_newest_stored_version_wins_at_start_and_sighup_is_refused() {
    let store_dir = tempfile::tempdir().unwrap();
    let db = store_dir.path().join("g.db");
    let store = store_table(&db, "store");
    let gateway = Gateway::start(&config("seed", &store));
    let admin = Admin::of(&gateway);
    assert_eq!(data_get(&gateway, "/").await.1, "seed");
    assert_eq!(
        admin.put_toml(config("api-2", &store), &[]).await.status,
        StatusCode::OK
    );

    // SIGHUP does not read the file in store mode.
    let line = gateway.reload_with(&config("file-edit", &store));
    assert!(line.contains("reload rejected"), "{line}");
    assert!(line.contains("store mode"), "{line}");
    assert_eq!(data_get(&gateway, "/").await.1, "api-2");
    assert_eq!(admin.version().await, 2);

    // A restart runs the newest stored version, not the (edited) file.
    drop(gateway);
    let gateway = Gateway::start(&config("file-edit", &store));
    let admin = Admin::of(&gateway);
    assert_eq!(data_get(&gateway, "/").await.1, "api-2");
    assert_eq!(admin.version().await, 2);
    assert_eq!(admin.version_count().await, 2);
}

// ---------------------------------------------------------------------------------------
// Admin API (must-show 2, 9)
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_config_applies_a_new_version_with_an_audit_record_and_etag() {
    let gateway = Gateway::start(&config("one", ""));
    let admin = Admin::of(&gateway);
    let before = admin.get("/config").await.body;

    let reply = admin
        .put_toml(
            config("two", ""),
            &[("if-match", "\"1\""), ("x-gatehouse-message", "say two")],
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert_eq!(reply.body["version"], 2);
    assert_eq!(reply.body["changed"], true);
    assert_eq!(reply.headers["etag"], "\"2\"");
    assert_eq!(
        data_get(&gateway, "/").await,
        (StatusCode::OK, "two".into())
    );

    // The same config again is a no-op.
    let reply = admin.put_toml(config("two", ""), &[]).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.body["changed"], false);
    assert_eq!(reply.body["version"], 2);

    // JSON bodies work too: GET /config's `config` can be sent back.
    let current = admin.get("/config").await.body;
    let mut json_config = current["config"].clone();
    json_config["routes"][0]["direct_response"]["body"] = json!("three");
    let reply = admin
        .call(
            http::Method::PUT,
            "/config",
            Some(("application/json", json_config.to_string())),
            &[],
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert_eq!(reply.body["version"], 3);
    assert_eq!(data_get(&gateway, "/").await.1, "three");

    let audit = admin.get("/audit").await.body;
    let records = audit["records"].as_array().unwrap();
    assert_eq!(records.len(), 3);
    let second = &records[1];
    assert_eq!(second["action"], "apply");
    assert_eq!(second["actor"], "anonymous");
    assert_eq!(second["message"], "say two");
    assert_eq!(second["before_version"], 1);
    assert_eq!(second["before_hash"], before["hash"]);
    assert_eq!(second["after_version"], 2);
    let versions = admin.get("/config/versions").await.body;
    assert_eq!(versions["current"], 3);
    assert_eq!(second["after_hash"], versions["versions"][1]["hash"]);
    let version_two = admin.get("/config/versions/2").await;
    assert_eq!(
        version_two.body["config"]["routes"][0]["direct_response"]["body"],
        "two"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_if_match_is_412_and_concurrent_applies_are_serialized() {
    let gateway = Gateway::start(&config("one", ""));
    let admin = Arc::new(Admin::of(&gateway));
    assert_eq!(
        admin.put_toml(config("two", ""), &[]).await.status,
        StatusCode::OK
    );

    let reply = admin
        .put_toml(config("stale", ""), &[("if-match", "\"1\"")])
        .await;
    assert_eq!(
        reply.status,
        StatusCode::PRECONDITION_FAILED,
        "{}",
        reply.body
    );
    assert_eq!(reply.body["error"], "stale_version");
    assert_eq!(reply.body["current_version"], 2);
    assert_eq!(data_get(&gateway, "/").await.1, "two");

    // Eight applies race on the same If-Match: exactly one wins, the rest see 412.
    let mut tasks = Vec::new();
    for index in 0..8 {
        let admin = admin.clone();
        tasks.push(tokio::spawn(async move {
            admin
                .put_toml(
                    config(&format!("race-{index}"), ""),
                    &[("if-match", "\"2\"")],
                )
                .await
                .status
        }));
    }
    let mut statuses = Vec::new();
    for task in tasks {
        statuses.push(task.await.unwrap());
    }
    let won = statuses.iter().filter(|s| **s == StatusCode::OK).count();
    let stale = statuses
        .iter()
        .filter(|s| **s == StatusCode::PRECONDITION_FAILED)
        .count();
    assert_eq!((won, stale), (1, 7), "{statuses:?}");
    assert_eq!(admin.version_count().await, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_admin_input_gets_a_precise_4xx_and_changes_nothing() {
    let gateway = Gateway::start(&config("one", ""));
    let admin = Admin::of(&gateway);
    let json = |text: &str| Some(("application/json", text.to_string()));

    let reply = admin
        .call(http::Method::PUT, "/config", json("{\"listeners\": ["), &[])
        .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert!(
        reply.body["message"]
            .as_str()
            .unwrap()
            .starts_with("invalid JSON"),
        "{}",
        reply.body
    );

    let reply = admin
        .call(
            http::Method::PUT,
            "/config",
            json(r#"{"listeners": [{"name": "public", "bind": "127.0.0.1:0", "colour": "red"}]}"#),
            &[],
        )
        .await;
    assert_eq!(reply.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(reply.body["error"], "invalid_config");
    assert_eq!(reply.body["errors"][0]["path"], "listeners[0].colour");

    // Every validation error, each with its path.
    let broken = "[[listeners]]\nname = \"public\"\nbind = \"nowhere\"\n\n[[routes]]\npool = \"missing\"\n\n[[routes]]\npool = \"missing\"\nname = \"\"\n";
    let reply = admin.put_toml(broken.into(), &[]).await;
    assert_eq!(
        reply.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{}",
        reply.body
    );
    let paths: Vec<&str> = reply.body["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|error| error["path"].as_str().unwrap())
        .collect();
    for expected in [
        "listeners[0].bind",
        "routes[0].pool",
        "routes[1].name",
        "routes[1].pool",
    ] {
        assert!(
            paths.contains(&expected),
            "{expected} missing from {paths:?}"
        );
    }

    // Bootstrap settings cannot change through the API.
    let moved = config("one", "").replace(
        "bind = \"127.0.0.1:0\"\n\n[[listeners]]",
        "bind = \"127.0.0.1:1\"\n\n[[listeners]]",
    );
    let reply = admin.put_toml(moved, &[]).await;
    assert_eq!(
        reply.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{}",
        reply.body
    );
    assert_eq!(reply.body["errors"][0]["path"], "admin");

    let reply = admin
        .call(
            http::Method::PUT,
            "/config",
            Some(("text/plain", config("x", ""))),
            &[],
        )
        .await;
    assert_eq!(reply.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);

    let reply = admin
        .put_toml(config("x", ""), &[("if-match", "yesterday")])
        .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);

    let reply = admin.post("/config/rollback/99", None).await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    assert_eq!(reply.body["error"], "unknown_version");
    assert_eq!(reply.body["message"], "no config version 99");

    let reply = admin.post("/config/rollback/latest", None).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);

    let reply = admin.call(http::Method::DELETE, "/config", None, &[]).await;
    assert_eq!(reply.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(reply.headers["allow"], "GET, PUT");

    let reply = admin.get("/nope").await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);

    // Nothing changed.
    assert_eq!(admin.version().await, 1);
    assert_eq!(admin.version_count().await, 1);
    assert_eq!(data_get(&gateway, "/").await.1, "one");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_the_gateway_cannot_run_is_rejected_and_the_store_is_untouched() {
    // Validation passes, but the new listener's port is taken: the apply fails at bind,
    // and the version written inside the transaction is rolled back.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let gateway = Gateway::start(&config("one", ""));
    let admin = Admin::of(&gateway);
    let text = format!(
        "{}\n[[listeners]]\nname = \"second\"\nbind = \"{}\"\n",
        config("one", ""),
        taken.local_addr().unwrap()
    );
    let reply = admin.put_toml(text, &[]).await;
    assert_eq!(
        reply.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{}",
        reply.body
    );
    assert_eq!(reply.body["error"], "rejected");
    assert!(
        reply.body["message"]
            .as_str()
            .unwrap()
            .contains("cannot bind"),
        "{}",
        reply.body
    );
    assert_eq!(admin.version_count().await, 1);
    let conn = open_store(&gateway.dir.path().join("gatehouse.db"));
    let audits: i64 = conn
        .query_row("SELECT count(*) FROM audit_log", [], |row| row.get(0))
        .unwrap();
    assert_eq!(audits, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validate_and_diff_report_against_the_running_config_without_changing_it() {
    let gateway = Gateway::start(&config("one", ""));
    let admin = Admin::of(&gateway);
    let toml = |text: String| Some(("application/toml", text));

    let reply = admin
        .post("/config/validate", toml(config("two", "")))
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert_eq!(reply.body["valid"], true);

    let broken = config("two", "").replace("127.0.0.1:0\"\nmax", "nowhere\"\nmax");
    let reply = admin.post("/config/validate", toml(broken)).await;
    assert_eq!(reply.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(reply.body["errors"][0]["path"], "listeners[0].bind");

    let changed = config("two", "").replace("max_connections = 50", "max_connections = 7");
    let reply = admin.post("/config/diff", toml(changed)).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert_eq!(reply.body["from_version"], 1);
    let text = reply.body["text"].as_str().unwrap();
    assert!(
        text.contains("~ routes[0].direct_response.body: \"one\" -> \"two\""),
        "{text}"
    );
    assert!(
        text.contains("~ listeners[0].max_connections: 50 -> 7"),
        "{text}"
    );
    assert_eq!(reply.body["changes"].as_array().unwrap().len(), 2, "{text}");

    assert_eq!(admin.version_count().await, 1);
    assert_eq!(data_get(&gateway, "/").await.1, "one");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_runs_an_old_version_again_as_a_new_audited_version() {
    let gateway = Gateway::start(&config("one", ""));
    let admin = Admin::of(&gateway);
    assert_eq!(
        admin.put_toml(config("two", ""), &[]).await.status,
        StatusCode::OK
    );
    assert_eq!(data_get(&gateway, "/").await.1, "two");
    let v1_hash = admin.get("/config/versions/1").await.body["hash"].clone();

    let reply = admin.post("/config/rollback/1", None).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert_eq!(reply.body["version"], 3);
    assert_eq!(reply.body["hash"], v1_hash);
    assert_eq!(reply.body["message"], "rollback to version 1");
    assert_eq!(data_get(&gateway, "/").await.1, "one");

    let audit = admin.get("/audit").await.body;
    assert_eq!(audit["records"][0]["action"], "rollback");
    assert_eq!(audit["records"][0]["before_version"], 2);
    assert_eq!(audit["records"][0]["after_hash"], v1_hash);

    // A stale If-Match refuses a rollback too.
    let reply = admin
        .call(
            http::Method::POST,
            "/config/rollback/2",
            None,
            &[("if-match", "\"2\"")],
        )
        .await;
    assert_eq!(reply.status, StatusCode::PRECONDITION_FAILED);
    assert_eq!(data_get(&gateway, "/").await.1, "one");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_reports_version_uptime_and_listeners_with_live_connections_and_limits() {
    let gateway = Gateway::start(&config("one", ""));
    let admin = Admin::of(&gateway);
    // One kept-alive data connection: once its response arrived it has been accepted and
    // counts as active.
    let client = http1_client();
    let response = within(
        "data request",
        client.get(gateway.url("public", "/")).send(),
    )
    .await
    .unwrap();
    assert_eq!(response.text().await.unwrap(), "one");

    let reply = admin.get("/status").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.body["version"], 1);
    assert_eq!(reply.body["ready"], true);
    assert_eq!(reply.body["store_mode"], "file");
    assert!(reply.body["uptime_seconds"].is_u64());
    let listener = &reply.body["listeners"][0];
    assert_eq!(listener["name"], "public");
    assert_eq!(listener["addr"], gateway.addr("public").to_string());
    assert_eq!(listener["max_connections"], 50);
    assert_eq!(listener["active_connections"], 1, "{listener}");
    assert_eq!(listener["accepted"], 1, "{listener}");
    drop(client);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_turns_false_while_draining_and_healthz_stays_ok() {
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
        "drain_timeout = \"120s\"\n[admin]\nbind = \"127.0.0.1:0\"\n\n[[listeners]]\nname = \"public\"\nbind = \"127.0.0.1:0\"\n\n[[pools]]\nname = \"app\"\nendpoints = [\"{}\"]\n\n[[routes]]\npool = \"app\"\n",
        backend.addr
    );
    let mut gateway = Gateway::start(&text);
    let admin = Admin::of(&gateway);
    let reply = admin.get("/ready").await;
    assert_eq!(
        (reply.status, reply.body["ready"].clone()),
        (StatusCode::OK, json!(true))
    );

    let url = gateway.url("public", "/slow");
    let held = tokio::spawn(async move { http1_client().get(url).send().await });
    within("the held request", arrived.recv()).await.unwrap();
    let from = gateway.stderr.len();
    gateway.signal(libc::SIGTERM);
    gateway
        .stderr
        .wait_for(from, PATIENCE, |line| line.contains("listeners closed"));

    let reply = admin.get("/ready").await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply.body, json!({"ready": false, "reason": "draining"}));
    let reply = admin.get("/healthz").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(admin.get("/status").await.body["ready"], false);

    release.send_replace(true);
    let response = within("held response", held).await.unwrap().unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(gateway.wait_exit(PATIENCE).success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_paths_are_never_served_on_data_plane_listeners() {
    let backend = Backend::echo().await;
    let text = format!(
        "[admin]\nbind = \"127.0.0.1:0\"\n\n[[listeners]]\nname = \"public\"\nbind = \"127.0.0.1:0\"\n\n[[pools]]\nname = \"app\"\nendpoints = [\"{}\"]\n\n[[routes]]\nmatch = {{ path_prefix = \"/app\" }}\npool = \"app\"\n",
        backend.addr
    );
    let gateway = Gateway::start(&text);
    for path in [
        "/config",
        "/config/versions",
        "/status",
        "/healthz",
        "/ready",
        "/audit",
    ] {
        let (status, body) = data_get(&gateway, path).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}: {body}");
        let body: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(body["error"], "no_route", "{path}");
    }
    // A PUT of a config on the data plane changes nothing either.
    let response = http1_client()
        .put(gateway.url("public", "/config"))
        .header("content-type", "application/toml")
        .body(config("hijack", ""))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    assert_eq!(Admin::of(&gateway).version().await, 1);
    assert_eq!(backend.count(), 0);
}

// ---------------------------------------------------------------------------------------
// Auth (part of must-show 5)
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_tokens_with_read_and_admin_scopes_and_never_logged() {
    let admin_secret = "s3cret-admin-token-0123456789";
    let read_secret = "s3cret-read-token-9876543210";
    let hash = |secret: &str| gatehouse::control::sha256_hex(secret.as_bytes());
    let tokens = format!(
        "[[admin.tokens]]\nname = \"ops\"\nsha256 = \"{}\"\nscope = \"admin\"\n\n[[admin.tokens]]\nname = \"dashboards\"\nsha256 = \"{}\"\nscope = \"read\"\n",
        hash(admin_secret),
        hash(read_secret)
    );
    let text = format!(
        "[admin]\nbind = \"127.0.0.1:0\"\n{tokens}\n[[listeners]]\nname = \"public\"\nbind = \"127.0.0.1:0\"\n\n[[routes]]\ndirect_response = {{ body = \"one\" }}\n"
    );
    let gateway = Gateway::start(&text);
    let two = text.replace("\"one\"", "\"two\"");

    // No token, a wrong token, a token in the wrong scheme: 401.
    let anonymous = Admin::of(&gateway);
    let reply = anonymous.get("/config").await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    assert_eq!(reply.headers["www-authenticate"], "Bearer");
    let wrong = Admin::with_token(&gateway, "guess");
    assert_eq!(wrong.get("/config").await.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        wrong.put_toml(two.clone(), &[]).await.status,
        StatusCode::UNAUTHORIZED
    );
    let basic = anonymous
        .call(
            http::Method::GET,
            "/config",
            None,
            &[("authorization", &format!("Basic {admin_secret}"))],
        )
        .await;
    assert_eq!(basic.status, StatusCode::UNAUTHORIZED);

    // Probes need no token.
    assert_eq!(anonymous.get("/healthz").await.status, StatusCode::OK);
    assert_eq!(anonymous.get("/ready").await.status, StatusCode::OK);

    // A read token reads but may not change anything: 403.
    let reader = Admin::with_token(&gateway, read_secret);
    assert_eq!(reader.get("/config").await.status, StatusCode::OK);
    assert_eq!(reader.get("/status").await.status, StatusCode::OK);
    let reply = reader.put_toml(two.clone(), &[]).await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN);
    assert_eq!(reply.body["error"], "forbidden");
    assert_eq!(
        reader.post("/config/rollback/1", None).await.status,
        StatusCode::FORBIDDEN
    );
    assert_eq!(data_get(&gateway, "/").await.1, "one");

    // The admin token changes it, and the audit log names the token.
    let operator = Admin::with_token(&gateway, admin_secret);
    let reply = operator.put_toml(two, &[]).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert_eq!(data_get(&gateway, "/").await.1, "two");
    let audit = reader.get("/audit").await.body;
    assert_eq!(audit["records"][0]["actor"], "ops");

    for line in gateway.stderr.snapshot() {
        assert!(
            !line.contains(admin_secret) && !line.contains(read_secret),
            "a token was logged: {line}"
        );
    }
}

#[tokio::test]
async fn an_admin_listener_off_loopback_without_tokens_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("g.toml");
    std::fs::write(
        &path,
        "[admin]\nbind = \"0.0.0.0:0\"\n\n[[listeners]]\nname = \"public\"\nbind = \"127.0.0.1:0\"\n",
    )
    .unwrap();
    let output = support::run_to_exit(&["validate", path.to_str().unwrap()], &[]).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("admin.tokens: at least one token is required"),
        "{stderr}"
    );
}

// ---------------------------------------------------------------------------------------
// Crash consistency (must-show 3)
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_a_loop_of_applies_leaves_a_consistent_store_that_the_restart_runs() {
    let store_dir = tempfile::tempdir().unwrap();
    let db = store_dir.path().join("g.db");
    let store = store_table(&db, "store");
    let mut gateway = Gateway::start(&config("v1", &store));
    let admin = Admin::of(&gateway);

    // Applies back to back; each acknowledged version is reported.
    let (acked_tx, mut acked) = mpsc::unbounded_channel::<i64>();
    let loop_store = store.clone();
    let applies = tokio::spawn(async move {
        for index in 2.. {
            let body = config(&format!("v{index}"), &loop_store);
            // Once the process is killed the request fails: the loop ends there.
            let Ok(reply) = admin
                .try_call(
                    http::Method::PUT,
                    "/config",
                    Some(("application/toml", body)),
                    &[],
                )
                .await
            else {
                break;
            };
            if reply.status != StatusCode::OK {
                break;
            }
            let _ = acked_tx.send(reply.body["version"].as_i64().unwrap());
        }
    });
    let mut last_acked = 1;
    while last_acked < 25 {
        last_acked = within("applies", acked.recv())
            .await
            .expect("apply loop ended");
    }
    gateway.signal(libc::SIGKILL);
    let _ = gateway.wait_exit(PATIENCE);
    let _ = within("the apply loop to stop", applies).await;
    while let Ok(version) = acked.try_recv() {
        last_acked = version;
    }

    // The store is consistent: intact, one audit record per version, hashes match.
    let conn = open_store(&db);
    let integrity: String = conn
        .query_row("PRAGMA integrity_check", [], |row| row.get(0))
        .unwrap();
    assert_eq!(integrity, "ok");
    let newest: i64 = conn
        .query_row("SELECT max(id) FROM config_versions", [], |row| row.get(0))
        .unwrap();
    assert!(
        newest == last_acked || newest == last_acked + 1,
        "newest stored {newest}, last acknowledged {last_acked}"
    );
    let (versions, audits, orphans): (i64, i64, i64) = conn
        .query_row(
            "SELECT (SELECT count(*) FROM config_versions), (SELECT count(*) FROM audit_log),
                    (SELECT count(*) FROM audit_log a LEFT JOIN config_versions v
                       ON a.after_version = v.id WHERE v.id IS NULL)",
            [],
            |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)),
        )
        .unwrap();
    assert_eq!((versions, audits, orphans), (newest, newest, 0));
    let mut statement = conn
        .prepare("SELECT hash, config FROM config_versions")
        .unwrap();
    let rows: Vec<(String, String)> = statement
        .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    for (hash, stored) in &rows {
        assert_eq!(hash, &gatehouse::control::sha256_hex(stored.as_bytes()));
    }
    let (newest_hash, newest_config): (String, String) = conn
        .query_row(
            "SELECT hash, config FROM config_versions WHERE id = ?1",
            [newest],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )
        .unwrap();
    drop(statement);
    drop(conn);
    let newest_body = serde_json::from_str::<Value>(&newest_config).unwrap()["routes"][0]
        ["direct_response"]["body"]
        .as_str()
        .unwrap()
        .to_string();

    // After a restart the running config is the last committed version.
    let gateway = Gateway::start(&config("v1", &store));
    let admin = Admin::of(&gateway);
    let current = admin.get("/config").await.body;
    assert_eq!(current["version"], newest);
    assert_eq!(current["hash"], newest_hash);
    assert_eq!(data_get(&gateway, "/").await.1, newest_body);
    assert_eq!(newest_body, format!("v{newest}"));
}

// ---------------------------------------------------------------------------------------
// Zero failed requests during 100 applies and rollbacks (must-show 4)
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_loop_sees_no_failed_request_during_100_applies_and_rollbacks() {
    let backend_a = Backend::echo().await;
    let backend_b = Backend::echo().await;
    let text = |round: usize, endpoint: SocketAddr| {
        format!(
            "[admin]\nbind = \"127.0.0.1:0\"\n\n[[listeners]]\nname = \"public\"\nbind = \"127.0.0.1:0\"\n\n[[pools]]\nname = \"app\"\nendpoints = [\"{endpoint}\"]\n\n[[routes]]\nname = \"round-{round}\"\npool = \"app\"\n"
        )
    };
    let gateway = Gateway::start(&text(0, backend_a.addr));
    let admin = Admin::of(&gateway);

    // Clients: keep-alive connections sending requests until told to stop; every
    // completed request is counted, every failure recorded.
    let (progress_tx, mut progress) = watch::channel(0usize);
    let progress_tx = Arc::new(progress_tx);
    let (stop_tx, stop) = watch::channel(false);
    let failures = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let completed = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for _ in 0..2 {
        let url = gateway.url("public", "/ping");
        let stop = stop.clone();
        let failures = failures.clone();
        let completed = completed.clone();
        let progress_tx = progress_tx.clone();
        clients.push(tokio::spawn(async move {
            let client = http1_client();
            while !*stop.borrow() {
                match client.get(&url).send().await {
                    Ok(response) if response.status() == StatusCode::OK => {
                        if let Err(err) = response.bytes().await {
                            failures.lock().unwrap().push(format!("body: {err}"));
                        }
                    }
                    Ok(response) => failures
                        .lock()
                        .unwrap()
                        .push(format!("status {}", response.status())),
                    Err(err) => failures.lock().unwrap().push(err.to_string()),
                }
                let done = completed.fetch_add(1, Ordering::SeqCst) + 1;
                progress_tx.send_replace(done);
            }
        }));
    }

    // 50 applies (alternating backends) and 50 rollbacks to version 1, waiting after each
    // change for at least one more request to complete.
    for round in 1..=50 {
        let endpoint = if round % 2 == 0 {
            backend_a.addr
        } else {
            backend_b.addr
        };
        let reply = admin.put_toml(text(round, endpoint), &[]).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
        let seen = *progress.borrow();
        within(
            "a request after the apply",
            progress.wait_for(|n| *n > seen),
        )
        .await
        .unwrap();
        let reply = admin.post("/config/rollback/1", None).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
        let seen = *progress.borrow();
        within(
            "a request after the rollback",
            progress.wait_for(|n| *n > seen),
        )
        .await
        .unwrap();
    }
    stop_tx.send_replace(true);
    for client in clients {
        within("a client to stop", client).await.unwrap();
    }

    assert_eq!(admin.version_count().await, 101);
    let failures = failures.lock().unwrap();
    assert!(
        failures.is_empty(),
        "{} failed requests: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(completed.load(Ordering::SeqCst) >= 100);
    assert!(backend_a.count() > 0 && backend_b.count() > 0);
}

// ---------------------------------------------------------------------------------------
// Unix socket admin listener
// ---------------------------------------------------------------------------------------

/// GET over a Unix socket with a plain hyper HTTP/1.1 client.
async fn unix_get(path: &Path, uri: &str) -> (StatusCode, Value) {
    use http_body_util::{BodyExt, Empty};
    let stream = within("connect", tokio::net::UnixStream::connect(path))
        .await
        .expect("connect to the admin socket");
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .expect("handshake");
    tokio::spawn(connection);
    let request = http::Request::get(uri)
        .header("host", "admin")
        .body(Empty::<bytes::Bytes>::new())
        .unwrap();
    let response = within(uri, sender.send_request(request)).await.unwrap();
    let status = response.status();
    let body = within("body", response.into_body().collect())
        .await
        .unwrap()
        .to_bytes();
    (status, serde_json::from_slice(&body).expect("JSON"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_on_a_unix_socket_is_mode_0600_and_survives_a_stale_socket_file() {
    use std::os::unix::fs::PermissionsExt;
    let socket_dir = tempfile::tempdir().unwrap();
    let socket = socket_dir.path().join("admin.sock");
    let text = format!(
        "[admin]\nbind = \"unix:{}\"\n\n[[listeners]]\nname = \"public\"\nbind = \"127.0.0.1:0\"\n\n[[routes]]\ndirect_response = {{ body = \"one\" }}\n",
        socket.display()
    );
    let gateway = Gateway::start(&text);
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "mode {mode:o}");
    assert_eq!(unix_get(&socket, "/healthz").await.0, StatusCode::OK);
    let (status, body) = unix_get(&socket, "/config").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["version"], 1);

    // Killed without cleanup, the socket file stays; the next start replaces it.
    drop(gateway);
    assert!(socket.exists());
    let _gateway = Gateway::start(&text);
    assert_eq!(unix_get(&socket, "/healthz").await.0, StatusCode::OK);
}

// ---------------------------------------------------------------------------------------
// `gatehouse ctl` against a running gateway (CTRL-7)
// ---------------------------------------------------------------------------------------

/// Runs `gatehouse ctl <args>` against `admin` and returns (success, stdout, stderr).
async fn ctl(admin: &str, args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let mut all = vec!["ctl", "--admin", admin];
    all.extend_from_slice(args);
    let output = support::run_to_exit(&all, env).await;
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_status_config_get_apply_diff_versions_rollback_and_audit_drive_a_running_gateway() {
    let gateway = Gateway::start(&config("one", ""));
    let url = format!("http://{}", gateway.addr("admin"));
    let admin = Admin::of(&gateway);

    let (ok, out, err) = ctl(&url, &["status"], &[]).await;
    assert!(ok, "{err}");
    assert!(out.contains("version 1"), "{out}");
    assert!(out.contains("LISTENER"), "{out}");
    assert!(out.contains("public"), "{out}");
    assert!(out.contains("firewall blocked 0"), "{out}");

    // `config get` prints TOML that applies back as "no changes".
    let (ok, current, err) = ctl(&url, &["config", "get"], &[]).await;
    assert!(ok, "{err}");
    assert!(current.starts_with("# version 1"), "{current}");
    let file = gateway.dir.path().join("edited.toml");
    std::fs::write(&file, &current).unwrap();
    let file_arg = file.to_str().unwrap();
    let (ok, out, err) = ctl(&url, &["config", "apply", file_arg], &[]).await;
    assert!(ok, "{err}");
    assert!(out.contains("no changes"), "{out}");

    // An edit: diff shows it; apply without --yes and without a terminal refuses.
    std::fs::write(&file, current.replace("body = \"one\"", "body = \"two\"")).unwrap();
    let (ok, out, err) = ctl(&url, &["config", "diff", file_arg], &[]).await;
    assert!(ok, "{err}");
    assert!(
        out.contains("~ routes[0].direct_response.body: \"one\" -> \"two\""),
        "{out}"
    );
    let (ok, out, err) = ctl(&url, &["config", "apply", file_arg], &[]).await;
    assert!(!ok);
    assert!(
        out.contains("\"one\" -> \"two\""),
        "the diff is shown first: {out}"
    );
    assert!(err.contains("stdin is not a terminal"), "{err}");
    assert!(err.contains("--yes"), "{err}");
    assert_eq!(admin.version().await, 1, "nothing was applied");

    let (ok, out, err) = ctl(&url, &["diff", file_arg], &[]).await;
    assert!(ok, "{err}");
    assert!(out.contains("\"one\" -> \"two\""), "{out}");
    let (ok, out, err) = ctl(
        &url,
        &["apply", "-f", file_arg, "--yes", "-m", "say two"],
        &[],
    )
    .await;
    assert!(ok, "{err}");
    assert!(out.contains("applied: now version 2"), "{out}");
    assert_eq!(data_get(&gateway, "/").await.1, "two");

    // An invalid file: every error with its path, nothing applied.
    std::fs::write(&file, current.replace("status = 200", "status = 1000")).unwrap();
    let (ok, _, err) = ctl(&url, &["config", "apply", "--yes", file_arg], &[]).await;
    assert!(!ok);
    assert!(err.contains("invalid_config (422)"), "{err}");
    assert!(err.contains("routes[0].direct_response.status"), "{err}");
    assert_eq!(admin.version().await, 2);

    let (ok, out, err) = ctl(&url, &["versions"], &[]).await;
    assert!(ok, "{err}");
    assert!(out.contains("2*"), "current version marked: {out}");
    assert!(out.contains("say two"), "{out}");

    let (ok, out, err) = ctl(&url, &["rollback", "1"], &[]).await;
    assert!(ok, "{err}");
    assert!(out.contains("now version 3"), "{out}");
    assert_eq!(data_get(&gateway, "/").await.1, "one");
    let (ok, _, err) = ctl(&url, &["rollback", "99"], &[]).await;
    assert!(!ok);
    assert!(err.contains("unknown_version (404)"), "{err}");

    let (ok, out, err) = ctl(&url, &["audit"], &[]).await;
    assert!(ok, "{err}");
    for action in ["seed", "apply", "rollback"] {
        assert!(out.contains(action), "{action}: {out}");
    }

    // --json gives the API's answer.
    let (ok, out, err) = ctl(&url, &["--json", "versions"], &[]).await;
    assert!(ok, "{err}");
    let versions: Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(versions["current"], 3);
    assert_eq!(versions["versions"].as_array().unwrap().len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_over_the_unix_socket_with_tokens_from_the_environment_and_scopes() {
    let socket_dir = tempfile::tempdir().unwrap();
    let socket = socket_dir.path().join("admin.sock");
    let hash = |secret: &str| gatehouse::control::sha256_hex(secret.as_bytes());
    let text = format!(
        "[admin]\nbind = \"unix:{}\"\n[[admin.tokens]]\nname = \"ops\"\nsha256 = \"{}\"\nscope = \"admin\"\n[[admin.tokens]]\nname = \"viewer\"\nsha256 = \"{}\"\nscope = \"read\"\n\n[[listeners]]\nname = \"public\"\nbind = \"127.0.0.1:0\"\n\n[[routes]]\ndirect_response = {{ body = \"one\" }}\n",
        socket.display(),
        hash("admin-secret"),
        hash("read-secret"),
    );
    let _gateway = Gateway::start(&text);
    let target = format!("unix:{}", socket.display());

    let (ok, _, err) = ctl(&target, &["status"], &[]).await;
    assert!(!ok);
    assert!(err.contains("unauthorized (401)"), "{err}");
    let (ok, out, err) = ctl(&target, &["status"], &[("GATEHOUSE_TOKEN", "read-secret")]).await;
    assert!(ok, "{err}");
    assert!(out.contains("public"), "{out}");
    let (ok, _, err) = ctl(
        &target,
        &["listeners", "set-limit", "public", "7"],
        &[("GATEHOUSE_TOKEN", "read-secret")],
    )
    .await;
    assert!(!ok);
    assert!(err.contains("forbidden (403)"), "{err}");
    let (ok, out, err) = ctl(
        &target,
        &[
            "--token",
            "admin-secret",
            "listeners",
            "set-limit",
            "public",
            "7",
        ],
        &[],
    )
    .await;
    assert!(ok, "{err}");
    assert!(out.contains("max_connections = 7"), "{out}");
    let (ok, out, err) = ctl(
        &target,
        &["--json", "audit"],
        &[("GATEHOUSE_TOKEN", "admin-secret")],
    )
    .await;
    assert!(ok, "{err}");
    let audit: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(audit["records"][0]["actor"], "ops");
    assert_eq!(audit["records"][0]["action"], "set_max_connections");

    // Nobody listening: a clear error, not a panic.
    let missing = format!("unix:{}", socket_dir.path().join("nope.sock").display());
    let (ok, _, err) = ctl(&missing, &["status"], &[]).await;
    assert!(!ok);
    assert!(err.contains("cannot reach the admin API"), "{err}");
}

// ---------------------------------------------------------------------------------------
// Listener connection limits through the admin API (CONN-3)
// ---------------------------------------------------------------------------------------

/// A kept-alive HTTP/1.1 connection that has had one answered request (so the gateway has
/// accepted it and counts it as active).
async fn open_connection(
    addr: SocketAddr,
) -> hyper::client::conn::http1::SendRequest<http_body_util::Empty<bytes::Bytes>> {
    let stream = within("connect", tokio::net::TcpStream::connect(addr))
        .await
        .expect("connect");
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .expect("handshake");
    tokio::spawn(connection);
    let request = http::Request::get("/")
        .header("host", "limits")
        .body(http_body_util::Empty::new())
        .unwrap();
    let response = within("request", sender.send_request(request))
        .await
        .expect("answered");
    assert_eq!(response.status(), StatusCode::OK);
    use http_body_util::BodyExt;
    within("body", response.into_body().collect())
        .await
        .expect("body");
    sender
}

/// Connects and sends a request: true when the gateway closes the connection without an
/// answer (over the limit).
async fn closed_at_accept(addr: SocketAddr) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // A reset can already arrive while connecting (the gateway closes with SO_LINGER 0).
    let Ok(mut stream) = within("connect", tokio::net::TcpStream::connect(addr)).await else {
        return true;
    };
    let _ = stream
        .write_all(b"GET / HTTP/1.1\r\nhost: limits\r\n\r\n")
        .await;
    let mut buffer = [0u8; 64];
    matches!(
        within("read", stream.read(&mut buffer)).await,
        Ok(0) | Err(_)
    )
}

async fn listener_status(admin: &Admin) -> Value {
    let reply = admin.get("/status").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    reply.body["listeners"][0].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_limits_set_through_the_admin_api_are_enforced_audited_and_survive_a_restart() {
    let store_dir = tempfile::tempdir().unwrap();
    let store = store_table(&store_dir.path().join("g.db"), "store");
    let gateway = Gateway::start(&config("one", &store));
    let admin = Admin::of(&gateway);
    let url = format!("http://{}", gateway.addr("admin"));
    let public = gateway.addr("public");

    let (ok, out, err) = ctl(&url, &["listeners", "set-limit", "public", "2"], &[]).await;
    assert!(ok, "{err}");
    assert!(out.contains("now version 2"), "{out}");
    assert_eq!(listener_status(&admin).await["max_connections"], 2);

    let first = open_connection(public).await;
    let second = open_connection(public).await;
    assert!(
        closed_at_accept(public).await,
        "a third connection must be closed"
    );
    let stats = listener_status(&admin).await;
    assert_eq!(stats["rejected_limit"], 1, "{stats}");
    assert_eq!(stats["active_connections"], 2, "{stats}");

    // Raised through the API (with If-Match on the current version): accepted.
    let reply = admin
        .call(
            http::Method::PUT,
            "/listeners/public/max_connections",
            Some((
                "application/json",
                json!({"max_connections": 3}).to_string(),
            )),
            &[("if-match", "\"2\"")],
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert_eq!(reply.body["version"], 3);
    assert_eq!(reply.headers["etag"], "\"3\"");
    let third = open_connection(public).await;
    assert_eq!(listener_status(&admin).await["rejected_limit"], 1);

    // Stale If-Match, unknown listener, bad bodies: precise 4xx, nothing changes.
    let put = |path: &'static str, body: String, if_match: &'static str| {
        let admin = &admin;
        async move {
            let headers: Vec<(&str, &str)> = if if_match.is_empty() {
                vec![]
            } else {
                vec![("if-match", if_match)]
            };
            admin
                .call(
                    http::Method::PUT,
                    path,
                    Some(("application/json", body)),
                    &headers,
                )
                .await
        }
    };
    let reply = put(
        "/listeners/public/max_connections",
        json!({"max_connections": 9}).to_string(),
        "\"2\"",
    )
    .await;
    assert_eq!(reply.status, StatusCode::PRECONDITION_FAILED);
    assert_eq!(reply.body["current_version"], 3);
    let reply = put(
        "/listeners/nope/max_connections",
        json!({"max_connections": 9}).to_string(),
        "",
    )
    .await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    assert_eq!(reply.body["error"], "unknown_name");
    for body in [
        "{\"max_connections\": -1}",
        "{\"max_connections\": \"many\"}",
        "{\"limit\": 3}",
        "not json",
    ] {
        let reply = put("/listeners/public/max_connections", body.into(), "").await;
        assert_eq!(
            reply.status,
            StatusCode::BAD_REQUEST,
            "{body}: {}",
            reply.body
        );
    }
    assert_eq!(admin.version().await, 3);

    let audit = admin.get("/audit").await.body;
    assert_eq!(audit["records"][0]["action"], "set_max_connections");
    assert_eq!(
        audit["records"][0]["message"],
        "listener public: max_connections = 3"
    );
    drop((first, second, third));

    // Store mode: the restart runs the stored limit, not the file's 50.
    drop(gateway);
    let gateway = Gateway::start(&config("one", &store));
    let admin = Admin::of(&gateway);
    assert_eq!(listener_status(&admin).await["max_connections"], 3);
    let public = gateway.addr("public");
    let _held: Vec<_> =
        futures_util::future::join_all((0..3).map(|_| open_connection(public))).await;
    assert!(
        closed_at_accept(public).await,
        "the restored limit is enforced"
    );
}

// ---------------------------------------------------------------------------------------
// OpenAPI, certificates, firewall counters, failed-auth rate limit (CTRL-4, CTRL-5)
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_is_served_without_a_token_and_matches_docs() {
    let hash = gatehouse::control::sha256_hex(b"secret");
    let text = format!(
        "[admin]\nbind = \"127.0.0.1:0\"\n[[admin.tokens]]\nname = \"ops\"\nsha256 = \"{hash}\"\nscope = \"admin\"\n\n[[listeners]]\nname = \"public\"\nbind = \"127.0.0.1:0\"\n\n[[routes]]\ndirect_response = {{ body = \"one\" }}\n"
    );
    let gateway = Gateway::start(&text);
    let reply = Admin::of(&gateway).get("/openapi.json").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.headers["content-type"], "application/json");
    let committed: Value =
        serde_json::from_str(include_str!("../docs/openapi.json")).expect("docs/openapi.json");
    assert_eq!(reply.body, committed);
    assert!(reply.body["paths"]["/listeners/{name}/max_connections"]["put"].is_object());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_endpoint_lists_names_expiry_and_files() {
    let dir = tempfile::tempdir().unwrap();
    let ca = support::tls::Ca::new("Test CA");
    let (cert, key) = ca
        .server(&["a.example", "b.example"])
        .write(dir.path(), "site");
    let text = format!(
        "[admin]\nbind = \"127.0.0.1:0\"\n\n[tls]\n[[tls.certificates]]\ncert = {:?}\nkey = {:?}\n\n[[listeners]]\nname = \"public\"\nbind = \"127.0.0.1:0\"\n\n[[routes]]\ndirect_response = {{ body = \"one\" }}\n",
        cert.display().to_string(),
        key.display().to_string()
    );
    let gateway = Gateway::start(&text);
    let admin = Admin::of(&gateway);
    let reply = admin.get("/certificates").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    let list = reply.body["certificates"].as_array().expect("list");
    assert_eq!(list.len(), 1, "{}", reply.body);
    let entry = &list[0];
    assert_eq!(entry["names"], json!(["a.example", "b.example"]));
    assert_eq!(entry["cert_path"], cert.display().to_string());
    assert!(entry["not_after"].as_i64().unwrap() > 0);
    assert_eq!(entry["expired"], false);
    assert!(entry["expires_in_seconds"].as_i64().unwrap() > 0);
    assert!(entry["not_after_rfc3339"].as_str().unwrap().ends_with('Z'));
    assert_eq!(
        reply.body["acme"],
        json!([]),
        "no ACME certificates configured"
    );

    let url = format!("http://{}", gateway.addr("admin"));
    let (ok, out, err) = ctl(&url, &["certificates"], &[]).await;
    assert!(ok, "{err}");
    assert!(out.contains("a.example,b.example"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_counts_firewall_blocks_by_reason() {
    let gateway = Gateway::start(&config("one", "[firewall]\ndeny_ips = [\"127.0.0.1\"]\n"));
    let admin = Admin::of(&gateway);
    assert!(closed_at_accept(gateway.addr("public")).await);
    let firewall = admin.get("/status").await.body["firewall"].clone();
    assert_eq!(firewall["blocked_total"], 1, "{firewall}");
    assert_eq!(firewall["blocked"]["ip"], 1, "{firewall}");
    assert_eq!(firewall["blocked"]["rate"], 0, "{firewall}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_wrong_tokens_from_one_address_get_429_with_retry_after() {
    let hash = gatehouse::control::sha256_hex(b"right-token");
    let text = format!(
        "[admin]\nbind = \"127.0.0.1:0\"\n[[admin.tokens]]\nname = \"ops\"\nsha256 = \"{hash}\"\nscope = \"admin\"\n\n[[listeners]]\nname = \"public\"\nbind = \"127.0.0.1:0\"\n\n[[routes]]\ndirect_response = {{ body = \"one\" }}\n"
    );
    let gateway = Gateway::start(&text);
    let right = Admin::with_token(&gateway, "right-token");
    assert_eq!(right.get("/status").await.status, StatusCode::OK);
    // A missing token is not a guess and does not count.
    for _ in 0..12 {
        assert_eq!(
            Admin::of(&gateway).get("/status").await.status,
            StatusCode::UNAUTHORIZED
        );
    }
    assert_eq!(right.get("/status").await.status, StatusCode::OK);
    let wrong = Admin::with_token(&gateway, "guess");
    for attempt in 0..10 {
        let reply = wrong.get("/status").await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "attempt {attempt}");
    }
    let reply = wrong.get("/status").await;
    assert_eq!(
        reply.status,
        StatusCode::TOO_MANY_REQUESTS,
        "{}",
        reply.body
    );
    assert_eq!(reply.body["error"], "too_many_auth_failures");
    let retry: u64 = reply.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    // Even the right token waits: a guesser cannot tell a hit. Probes stay open.
    assert_eq!(
        right.get("/status").await.status,
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(right.get("/healthz").await.status, StatusCode::OK);
    assert!(!gateway
        .stderr
        .snapshot()
        .iter()
        .any(|line| line.contains("guess") || line.contains("right-token")));
}

// ---------------------------------------------------------------------------------------
// Routes, pools and firewall rules as resources (CTRL-4)
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_pools_and_firewall_rules_are_resources_with_versions_if_match_and_audit() {
    let backend = Backend::start(Arc::new(|_request| {
        Box::pin(async { Response::new(full("from-backend")) })
    }))
    .await;
    let gateway = Gateway::start(&config("fallback", ""));
    let admin = Admin::of(&gateway);
    let json_body = |value: Value| Some(("application/json", value.to_string()));

    // The unnamed route has its default name.
    let reply = admin.get("/routes").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.body["routes"][0]["name"], "route0");
    assert_eq!(reply.headers["etag"], "\"1\"");

    // Add a pool (201, name from the path), then a route using it (201).
    let reply = admin
        .call(
            http::Method::PUT,
            "/pools/api",
            json_body(json!({"endpoints": [backend.addr.to_string()]})),
            &[("if-match", "\"1\"")],
        )
        .await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.body);
    assert_eq!(reply.body["version"], 2);
    let reply = admin
        .call(
            http::Method::PUT,
            "/routes/api",
            json_body(json!({"match": {"path_prefix": "/api"}, "pool": "api", "priority": 10})),
            &[("if-match", "\"2\"")],
        )
        .await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.body);
    assert_eq!(data_get(&gateway, "/api/x").await.1, "from-backend");
    assert_eq!(data_get(&gateway, "/other").await.1, "fallback");
    let reply = admin.get("/routes/api").await;
    assert_eq!(reply.body["pool"], "api");
    assert_eq!(reply.headers["etag"], "\"3\"");
    assert_eq!(admin.get("/pools/api").await.body["name"], "api");
    assert_eq!(
        admin.get("/pools").await.body["pools"]
            .as_array()
            .unwrap()
            .len(),
        1
    );

    // Replace (200), with a stale If-Match first (412).
    let replacement = json!({"direct_response": {"body": "replaced"}, "match": {"path_prefix": "/api"}, "priority": 10});
    let reply = admin
        .call(
            http::Method::PUT,
            "/routes/api",
            json_body(replacement.clone()),
            &[("if-match", "\"2\"")],
        )
        .await;
    assert_eq!(reply.status, StatusCode::PRECONDITION_FAILED);
    let reply = admin
        .call(
            http::Method::PUT,
            "/routes/api",
            json_body(replacement),
            &[],
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert_eq!(data_get(&gateway, "/api/x").await.1, "replaced");

    // Bad input: precise 4xx, nothing changes.
    let version = admin.version().await;
    let cases: Vec<(&str, &str, Value, StatusCode, &str)> = vec![
        (
            "PUT",
            "/routes/api",
            json!({"pool": "missing"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "pool",
        ),
        (
            "PUT",
            "/routes/api",
            json!({"nonsense": 1}),
            StatusCode::BAD_REQUEST,
            "nonsense",
        ),
        (
            "PUT",
            "/routes/api",
            json!({"name": "other", "pool": "api"}),
            StatusCode::BAD_REQUEST,
            "differs",
        ),
        (
            "PUT",
            "/pools/api",
            json!({"endpoints": ["not an address"]}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "endpoints",
        ),
        (
            "DELETE",
            "/routes/nope",
            Value::Null,
            StatusCode::NOT_FOUND,
            "no route named",
        ),
        (
            "DELETE",
            "/pools/nope",
            Value::Null,
            StatusCode::NOT_FOUND,
            "no pool named",
        ),
        (
            "PUT",
            "/firewall",
            json!({"deny_ips": ["not-an-ip"]}),
            StatusCode::BAD_REQUEST,
            "deny_ips",
        ),
    ];
    for (method, path, body, status, needle) in cases {
        let body = (!body.is_null()).then(|| ("application/json", body.to_string()));
        let reply = admin.call(method.parse().unwrap(), path, body, &[]).await;
        assert_eq!(reply.status, status, "{method} {path}: {}", reply.body);
        assert!(
            reply.body.to_string().contains(needle),
            "{method} {path}: {}",
            reply.body
        );
    }
    // A pool still used by a route cannot go.
    let reply = admin
        .call(
            http::Method::PUT,
            "/routes/api",
            json_body(json!({"match": {"path_prefix": "/api"}, "pool": "api"})),
            &[],
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    let version_with_route = admin.version().await;
    assert_eq!(version_with_route, version + 1);
    let reply = admin
        .call(http::Method::DELETE, "/pools/api", None, &[])
        .await;
    assert_eq!(
        reply.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{}",
        reply.body
    );
    assert!(reply.body["errors"][0]["path"]
        .as_str()
        .unwrap()
        .starts_with("routes["));
    assert_eq!(admin.version().await, version_with_route);

    // Delete the route, then the pool.
    let reply = admin
        .call(http::Method::DELETE, "/routes/api", None, &[])
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    let reply = admin
        .call(http::Method::DELETE, "/pools/api", None, &[])
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert_eq!(data_get(&gateway, "/api/x").await.1, "fallback");

    // Firewall rules: replace, and the data plane blocks at once.
    let reply = admin.get("/firewall").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.body["deny_ips"], json!([]));
    let reply = admin
        .call(
            http::Method::PUT,
            "/firewall",
            json_body(json!({"deny_ips": ["127.0.0.1"]})),
            &[],
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert!(closed_at_accept(gateway.addr("public")).await);
    assert_eq!(
        admin.get("/firewall").await.body["deny_ips"],
        json!(["127.0.0.1"])
    );

    let audit = admin.get("/audit").await.body;
    let actions: Vec<&str> = audit["records"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|record| record["action"].as_str())
        .collect();
    for action in [
        "put_pool",
        "put_route",
        "delete_route",
        "delete_pool",
        "put_firewall",
    ] {
        assert!(actions.contains(&action), "{action}: {actions:?}");
    }
}

// ---------------------------------------------------------------------------------------
// Store backup (CTRL-3, must-show 11)
// ---------------------------------------------------------------------------------------

fn rows(db: &Path, sql: &str) -> Vec<String> {
    let conn = open_store(db);
    let mut statement = conn.prepare(sql).unwrap();
    statement
        .query_map([], |row| row.get::<_, String>(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

const VERSIONS_SQL: &str =
    "SELECT id || ' ' || hash || ' ' || author || ' ' || message FROM config_versions ORDER BY id";
const AUDIT_SQL: &str = "SELECT id || ' ' || actor || ' ' || action || ' ' || after_version || ' ' || message FROM audit_log ORDER BY id";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn online_backups_through_ctl_and_the_store_command_restore_the_same_versions_and_audit() {
    use std::os::unix::fs::PermissionsExt;
    let store_dir = tempfile::tempdir().unwrap();
    let live = store_dir.path().join("live.db");
    let store = store_table(&live, "store");
    let gateway = Gateway::start(&config("one", &store));
    let admin = Admin::of(&gateway);
    let url = format!("http://{}", gateway.addr("admin"));
    for body in ["two", "three"] {
        assert_eq!(
            admin.put_toml(config(body, &store), &[]).await.status,
            StatusCode::OK
        );
    }
    assert_eq!(
        admin.post("/config/rollback/2", None).await.status,
        StatusCode::OK
    );

    // Through the admin API, while the gateway runs.
    let by_ctl = store_dir.path().join("by-ctl.db");
    let (ok, out, err) = ctl(&url, &["backup", by_ctl.to_str().unwrap()], &[]).await;
    assert!(ok, "{err}");
    assert!(out.contains("backup written"), "{out}");
    let mode = std::fs::metadata(&by_ctl).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "{mode:o}");

    // From the store file directly, while the gateway runs.
    let by_command = store_dir.path().join("by-command.db");
    let output = support::run_to_exit(
        &[
            "store",
            "backup",
            "--config",
            gateway.config_path.to_str().unwrap(),
            by_command.to_str().unwrap(),
        ],
        &[],
    )
    .await;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );

    let expected_versions = rows(&live, VERSIONS_SQL);
    let expected_audit = rows(&live, AUDIT_SQL);
    assert_eq!(expected_versions.len(), 4);
    for backup in [&by_ctl, &by_command] {
        assert_eq!(rows(backup, VERSIONS_SQL), expected_versions);
        assert_eq!(rows(backup, AUDIT_SQL), expected_audit);
    }
    drop(gateway);

    // Restore: put the backup where `store.path` points and start (store mode): the same
    // history and the same running config, with no new version.
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", live.display()));
    }
    std::fs::copy(&by_ctl, &live).unwrap();
    let gateway = Gateway::start(&config("file-ignored", &store));
    let admin = Admin::of(&gateway);
    assert_eq!(data_get(&gateway, "/").await.1, "two");
    assert_eq!(admin.version().await, 4);
    assert_eq!(admin.version_count().await, 4);
    let audit = admin.get("/audit").await.body;
    assert_eq!(audit["records"].as_array().unwrap().len(), 4);
    assert_eq!(audit["records"][0]["action"], "rollback");

    // An unwritable destination is a clear error.
    let (ok, _, err) = ctl(
        &format!("http://{}", gateway.addr("admin")),
        &["backup", "/nonexistent-dir/x.db"],
        &[],
    )
    .await;
    assert!(!ok);
    assert!(err.contains("/nonexistent-dir/x.db"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_routes_pools_and_firewall_commands_list_put_and_remove() {
    let backend = Backend::start(Arc::new(|_request| {
        Box::pin(async { Response::new(full("from-backend")) })
    }))
    .await;
    let gateway = Gateway::start(&config("fallback", ""));
    let url = format!("http://{}", gateway.addr("admin"));
    let dir = gateway.dir.path();
    let pool_file = dir.join("pool.toml");
    std::fs::write(&pool_file, format!("endpoints = [\"{}\"]\n", backend.addr)).unwrap();
    let route_file = dir.join("route.toml");
    std::fs::write(
        &route_file,
        "pool = \"api\"\npriority = 5\n[match]\npath_prefix = \"/api\"\n",
    )
    .unwrap();
    let path = |file: &Path| file.to_str().unwrap().to_string();

    let (ok, out, err) = ctl(&url, &["pools", "put", "api", &path(&pool_file)], &[]).await;
    assert!(ok, "{err}");
    assert!(out.contains("pool api added: now version 2"), "{out}");
    let (ok, out, err) = ctl(&url, &["routes", "put", "api", &path(&route_file)], &[]).await;
    assert!(ok, "{err}");
    assert!(out.contains("route api added: now version 3"), "{out}");
    assert_eq!(data_get(&gateway, "/api/1").await.1, "from-backend");

    let (ok, out, err) = ctl(&url, &["routes", "list"], &[]).await;
    assert!(ok, "{err}");
    assert!(out.contains("route0"), "{out}");
    assert!(out.contains("path_prefix=/api"), "{out}");
    assert!(out.contains("pool api"), "{out}");
    let (ok, out, err) = ctl(&url, &["pools", "list"], &[]).await;
    assert!(ok, "{err}");
    assert!(out.contains(&backend.addr.to_string()), "{out}");
    let (ok, out, err) = ctl(&url, &["routes", "get", "api"], &[]).await;
    assert!(ok, "{err}");
    let route: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(route["priority"], 5);

    // Removing a pool in use fails with the path of the route that uses it.
    let (ok, _, err) = ctl(&url, &["pools", "remove", "api"], &[]).await;
    assert!(!ok);
    assert!(err.contains("invalid_config (422)"), "{err}");
    assert!(err.contains("routes[1].pool"), "{err}");
    let (ok, out, err) = ctl(&url, &["routes", "remove", "api"], &[]).await;
    assert!(ok, "{err}");
    assert!(out.contains("route api removed"), "{out}");
    let (ok, _, err) = ctl(&url, &["pools", "remove", "api"], &[]).await;
    assert!(ok, "{err}");
    let (ok, _, err) = ctl(&url, &["routes", "remove", "api"], &[]).await;
    assert!(!ok);
    assert!(err.contains("unknown_name (404)"), "{err}");

    let firewall_file = dir.join("firewall.json");
    std::fs::write(&firewall_file, "{\"deny_cidrs\": [\"127.0.0.0/8\"]}").unwrap();
    let (ok, out, err) = ctl(&url, &["firewall", "put", &path(&firewall_file)], &[]).await;
    assert!(ok, "{err}");
    assert!(out.contains("firewall rules replaced"), "{out}");
    let (ok, out, err) = ctl(&url, &["firewall", "get"], &[]).await;
    assert!(ok, "{err}");
    assert!(out.contains("127.0.0.0/8"), "{out}");
    assert!(closed_at_accept(gateway.addr("public")).await);
    let (ok, out, err) = ctl(&url, &["status"], &[]).await;
    assert!(ok, "{err}");
    assert!(out.contains("firewall blocked 1"), "{out}");
}

/// Property-based checks of the running admin API against `docs/openapi.json` with
/// schemathesis: no 5xx, documented statuses, content types, headers and response schemas,
/// invalid input rejected. Skipped (with a note) when `schemathesis` is not installed;
/// `scripts/test.sh` installs it. Wrong tokens are not sent (`ignored_auth`): the
/// failed-auth limiter would answer 429 to the rest of the run, which its own test covers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_conforms_to_its_openapi_document_under_schemathesis() {
    let available = std::process::Command::new("schemathesis")
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    if !available {
        eprintln!("SKIPPED: schemathesis is not installed (scripts/test.sh installs it)");
        return;
    }
    let hash = gatehouse::control::sha256_hex(b"fuzz-token");
    let text = format!(
        "[admin]\nbind = \"127.0.0.1:0\"\n[[admin.tokens]]\nname = \"fuzzer\"\nsha256 = \"{hash}\"\nscope = \"admin\"\n\n[[listeners]]\nname = \"public\"\nbind = \"127.0.0.1:0\"\n\n[[routes]]\ndirect_response = {{ body = \"one\" }}\n"
    );
    let gateway = Gateway::start(&text);
    let url = format!("http://{}/openapi.json", gateway.addr("admin"));
    let work = tempfile::tempdir().unwrap();
    let mut command = tokio::process::Command::new("schemathesis");
    command
        .current_dir(work.path())
        .env("NO_COLOR", "1")
        .args([
            "run",
            &url,
            "--header",
            "Authorization: Bearer fuzz-token",
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,\
             response_headers_conformance,response_schema_conformance,\
             negative_data_rejection,missing_required_header,unsupported_method,\
             allow_header_conformance",
            "--max-examples",
            "10",
            "--workers",
            "1",
            "--seed",
            "20261201",
            "--generation-database",
            "none",
        ])
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let output = tokio::time::timeout(std::time::Duration::from_secs(300), command.output())
        .await
        .expect("schemathesis finished within 5 minutes")
        .expect("run schemathesis");
    let report = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "schemathesis found failures:\n{report}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // The gateway is still healthy afterwards.
    assert_eq!(
        Admin::of(&gateway).get("/healthz").await.status,
        StatusCode::OK
    );
}

// ---------------------------------------------------------------------------------------
// Admin API over TLS with client certificates (CTRL-5)
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_over_mutual_tls_takes_client_certificates_as_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let ca = support::tls::Ca::new("Ops CA");
    let ca_pem = ca.write(dir.path(), "ops-ca");
    let (server_cert, server_key) = ca.server(&["127.0.0.1"]).write(dir.path(), "admin");
    let (client_cert, client_key) = ca.client("ops-client").write(dir.path(), "client");
    let stranger = support::tls::Ca::new("Other CA");
    let (other_cert, other_key) = stranger.client("intruder").write(dir.path(), "other");
    let text = format!(
        "[admin]\nbind = \"127.0.0.1:0\"\ntls = {{ cert = {:?}, key = {:?}, client_ca = {:?} }}\n\n[[listeners]]\nname = \"public\"\nbind = \"127.0.0.1:0\"\n\n[[routes]]\ndirect_response = {{ body = \"one\" }}\n",
        server_cert.display().to_string(),
        server_key.display().to_string(),
        ca_pem.display().to_string(),
    );
    let gateway = Gateway::start(&text);
    let https = format!("https://{}", gateway.addr("admin"));
    let s = |path: &Path| path.to_str().unwrap().to_string();
    let (ca_arg, cert_arg, key_arg) = (s(&ca_pem), s(&client_cert), s(&client_key));
    let trusted = ["--cacert", ca_arg.as_str()];
    let identity = [
        "--cacert",
        ca_arg.as_str(),
        "--cert",
        cert_arg.as_str(),
        "--key",
        key_arg.as_str(),
    ];
    // With the client certificate: an admin, recorded by certificate subject.
    let mut args: Vec<&str> = identity.to_vec();
    args.extend(["listeners", "set-limit", "public", "9"]);
    let (ok, out, err) = ctl(&https, &args, &[]).await;
    assert!(ok, "{err}");
    assert!(out.contains("now version 2"), "{out}");
    let mut args: Vec<&str> = identity.to_vec();
    args.extend(["--json", "audit"]);
    let (ok, out, err) = ctl(&https, &args, &[]).await;
    assert!(ok, "{err}");
    let audit: Value = serde_json::from_str(&out).unwrap();
    let actor = audit["records"][0]["actor"].as_str().unwrap().to_string();
    assert!(actor.starts_with("cert:"), "{actor}");
    assert!(actor.contains("CN=ops-client"), "{actor}");

    // Without one: 401 with a clear message.
    let mut args: Vec<&str> = trusted.to_vec();
    args.push("status");
    let (ok, _, err) = ctl(&https, &args, &[]).await;
    assert!(!ok);
    assert!(err.contains("unauthorized (401)"), "{err}");
    assert!(err.contains("client certificate"), "{err}");

    // A certificate from another CA never gets an answer.
    let (other_cert, other_key) = (s(&other_cert), s(&other_key));
    let args = [
        "--cacert",
        ca_arg.as_str(),
        "--cert",
        other_cert.as_str(),
        "--key",
        other_key.as_str(),
        "status",
    ];
    let (ok, out, err) = ctl(&https, &args, &[]).await;
    assert!(!ok, "{out}");
    assert!(!err.contains("version"), "{err}");

    // Plain HTTP to the TLS port, or an untrusted server certificate: refused.
    let plain = format!("http://{}", gateway.addr("admin"));
    let (ok, _, _) = ctl(&plain, &identity_then(&identity, "status"), &[]).await;
    assert!(!ok);
    let (ok, _, err) = ctl(
        &https,
        &[
            "--cert",
            cert_arg.as_str(),
            "--key",
            key_arg.as_str(),
            "status",
        ],
        &[],
    )
    .await;
    assert!(!ok);
    assert!(err.contains("TLS"), "{err}");

    // TLS is for TCP only.
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        format!(
            "[admin]\nbind = \"unix:/tmp/x.sock\"\ntls = {{ cert = {:?}, key = {:?} }}\n\n[[listeners]]\nname = \"public\"\nbind = \"127.0.0.1:0\"\n",
            server_cert.display().to_string(),
            server_key.display().to_string()
        ),
    )
    .unwrap();
    let output = support::run_to_exit(&["validate", bad.to_str().unwrap()], &[]).await;
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("admin.tls"));
}

fn identity_then<'a>(identity: &[&'a str], command: &'a str) -> Vec<&'a str> {
    let mut args = identity.to_vec();
    args.push(command);
    args
}

// ---------------------------------------------------------------------------------------
// Token rotation without a restart (CTRL-5)
// ---------------------------------------------------------------------------------------

fn config_with_token(body: &str, extra: &str, token: &str) -> String {
    let hash = gatehouse::control::sha256_hex(token.as_bytes());
    format!(
        "{extra}\n[admin]\nbind = \"127.0.0.1:0\"\n[[admin.tokens]]\nname = \"ops-{}\"\nsha256 = \"{hash}\"\nscope = \"admin\"\n\n[[listeners]]\nname = \"public\"\nbind = \"127.0.0.1:0\"\n\n[[routes]]\ndirect_response = {{ body = \"{body}\" }}\n",
        &token[..3]
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_rotates_admin_tokens_without_a_restart_in_both_store_modes() {
    // File mode: the rest of the file applies as usual.
    let gateway = Gateway::start(&config_with_token("one", "", "old-token"));
    let old = Admin::with_token(&gateway, "old-token");
    let new = Admin::with_token(&gateway, "new-token");
    assert_eq!(old.get("/status").await.status, StatusCode::OK);
    assert_eq!(new.get("/status").await.status, StatusCode::UNAUTHORIZED);
    let line = gateway.reload_with(&config_with_token("two", "", "new-token"));
    assert!(line.contains("reload succeeded"), "{line}");
    assert_eq!(old.get("/status").await.status, StatusCode::UNAUTHORIZED);
    assert_eq!(new.get("/status").await.status, StatusCode::OK);
    assert_eq!(data_get(&gateway, "/").await.1, "two");
    // The stored config carries the new token, so GET /config can be sent back as is.
    let current = new.get("/config").await.body;
    assert_eq!(current["config"]["admin"]["tokens"][0]["name"], "ops-new");
    let reply = new
        .call(
            http::Method::PUT,
            "/config",
            Some(("application/json", current["config"].to_string())),
            &[],
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert_eq!(reply.body["changed"], false);
    drop(gateway);

    // Store mode: only the tokens are taken from the file, as an audited version.
    let store_dir = tempfile::tempdir().unwrap();
    let store = store_table(&store_dir.path().join("g.db"), "store");
    let gateway = Gateway::start(&config_with_token("one", &store, "old-token"));
    let old = Admin::with_token(&gateway, "old-token");
    let new = Admin::with_token(&gateway, "new-token");
    let line = gateway.reload_with(&config_with_token("file-edit", &store, "new-token"));
    assert!(line.contains("reload succeeded"), "{line}");
    assert_eq!(old.get("/status").await.status, StatusCode::UNAUTHORIZED);
    assert_eq!(new.get("/status").await.status, StatusCode::OK);
    assert_eq!(
        data_get(&gateway, "/").await.1,
        "one",
        "the rest of the file is ignored"
    );
    let audit = new.get("/audit").await.body;
    assert_eq!(audit["records"][0]["action"], "rotate_tokens");
    // Without a token change, SIGHUP in store mode is still refused.
    let line = gateway.reload_with(&config_with_token("file-edit-2", &store, "new-token"));
    assert!(line.contains("reload rejected"), "{line}");
}

// ---------------------------------------------------------------------------------------
// Guarded apply (CTRL-10)
// ---------------------------------------------------------------------------------------

fn guarded_config(endpoint: &str) -> String {
    format!(
        "[admin]\nbind = \"127.0.0.1:0\"\n\n[[listeners]]\nname = \"public\"\nbind = \"127.0.0.1:0\"\n\n[[pools]]\nname = \"app\"\nendpoints = [\"{endpoint}\"]\n\n[[routes]]\npool = \"app\"\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guarded_apply_that_breaks_a_route_under_load_is_rolled_back_and_audited() {
    let backend = Backend::start(Arc::new(|_request| {
        Box::pin(async { Response::new(full("from-backend")) })
    }))
    .await;
    let good = guarded_config(&backend.addr.to_string());
    // Port 1 on loopback refuses connections: every request through it is a 502.
    let broken = guarded_config("127.0.0.1:1");
    let gateway = Gateway::start(&good);
    let admin = Admin::of(&gateway);
    assert_eq!(data_get(&gateway, "/").await.1, "from-backend");

    // Load: a client loop until told to stop.
    let (stop, stopped) = watch::channel(false);
    let url = gateway.url("public", "/");
    let load = tokio::spawn(async move {
        let client = http1_client();
        let mut sent = 0u64;
        while !*stopped.borrow() {
            let _ = client.get(&url).send().await;
            sent += 1;
        }
        sent
    });

    // Bad guard parameters: 400, nothing applied.
    for query in [
        "?bake=10s",
        "?max_5xx_rate=0.1",
        "?bake=10s&max_5xx_rate=2",
        "?bake=2h&max_5xx_rate=0.1",
        "?bake=10s&max_5xx_rate=0.1&surprise=1",
    ] {
        let reply = admin
            .call(
                http::Method::PUT,
                &format!("/config{query}"),
                Some(("application/toml", broken.clone())),
                &[],
            )
            .await;
        assert_eq!(
            reply.status,
            StatusCode::BAD_REQUEST,
            "{query}: {}",
            reply.body
        );
    }
    assert_eq!(admin.version().await, 1);

    let from = gateway.stderr.len();
    let reply = admin
        .call(
            http::Method::PUT,
            "/config?bake=30s&max_5xx_rate=0.2&min_requests=5",
            Some(("application/toml", broken.clone())),
            &[],
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert_eq!(reply.body["version"], 2);
    assert_eq!(reply.body["guard"]["state"], "baking");
    let line = gateway.stderr.wait_for(from, PATIENCE, |line| {
        line.contains("guarded apply rolled back")
    });
    assert!(line.contains("restored=1"), "{line}");
    assert_eq!(data_get(&gateway, "/").await.1, "from-backend");
    assert_eq!(admin.version().await, 3);
    let audit = admin.get("/audit").await.body;
    let record = &audit["records"][0];
    assert_eq!(record["action"], "guard_rollback");
    assert_eq!(record["actor"], "guard");
    assert_eq!(record["before_version"], 2);
    assert!(
        record["message"].as_str().unwrap().contains("5xx rate"),
        "{record}"
    );
    let status = admin.get("/status").await.body;
    assert_eq!(status["guard"]["state"], "rolled_back", "{status}");
    assert_eq!(status["guard"]["version"], 2);

    // A change that keeps the gates green passes its bake and stays.
    let from = gateway.stderr.len();
    let calmer = good.replace("[[routes]]\n", "[[routes]]\npriority = 1\n");
    let file = gateway.dir.path().join("calmer.toml");
    std::fs::write(&file, calmer).unwrap();
    let admin_url = format!("http://{}", gateway.addr("admin"));
    let (ok, out, err) = ctl(
        &admin_url,
        &[
            "apply",
            "-f",
            file.to_str().unwrap(),
            "--yes",
            "--bake",
            "300ms",
            "--max-5xx-rate",
            "0.2",
            "--max-p95",
            "5s",
        ],
        &[],
    )
    .await;
    assert!(ok, "{err}");
    assert!(out.contains("guarded: baking"), "{out}");
    gateway
        .stderr
        .wait_for(from, PATIENCE, |line| line.contains("guarded apply passed"));
    let status = admin.get("/status").await.body;
    assert_eq!(status["guard"]["state"], "passed", "{status}");
    assert_eq!(admin.version().await, 4);
    let (ok, out, err) = ctl(&admin_url, &["status"], &[]).await;
    assert!(ok, "{err}");
    assert!(out.contains("guarded apply of version 4: passed"), "{out}");

    stop.send(true).unwrap();
    let sent = within("load loop", load).await.unwrap();
    assert!(sent > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn breakers_endpoint_and_ctl_breakers_show_each_pool() {
    let backend = Backend::echo().await;
    let text = format!(
        "[admin]\nbind = \"127.0.0.1:0\"\n\n[[listeners]]\nname = \"public\"\nbind = \"127.0.0.1:0\"\n\n[[pools]]\nname = \"guarded\"\nendpoints = [\"{0}\"]\ncircuit_breaker = {{ error_percent = 40, min_requests = 10 }}\n\n[[pools]]\nname = \"plain\"\nendpoints = [\"{0}\"]\n\n[[routes]]\npool = \"guarded\"\n",
        backend.addr
    );
    let gateway = Gateway::start(&text);
    let admin = Admin::of(&gateway);
    let reply = admin.get("/breakers").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    let breakers = reply.body["breakers"].as_array().unwrap();
    assert_eq!(breakers.len(), 2, "{}", reply.body);
    assert_eq!(breakers[0]["pool"], "guarded");
    assert_eq!(breakers[0]["state"], "closed");
    assert_eq!(breakers[0]["settings"]["error_percent"], 40);
    assert_eq!(breakers[0]["rejections"], 0);
    assert_eq!(breakers[1]["pool"], "plain");
    assert_eq!(breakers[1]["state"], "disabled");
    assert_eq!(breakers[1]["settings"], Value::Null);

    let url = format!("http://{}", gateway.addr("admin"));
    let (ok, out, err) = ctl(&url, &["breakers"], &[]).await;
    assert!(ok, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("POOL"), "{out}");
    assert!(
        lines[1].contains("guarded")
            && lines[1].contains("closed")
            && lines[1].contains("40% of 10+"),
        "{out}"
    );
    assert!(
        lines[2].contains("plain") && lines[2].contains("disabled"),
        "{out}"
    );
    let (ok, out, err) = ctl(&url, &["--json", "breakers"], &[]).await;
    assert!(ok, "{err}");
    let json: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json["breakers"][1]["state"], "disabled");
}
