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
    assert_eq!(schema, 1);
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
