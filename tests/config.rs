//! CTRL-1: config files through the real binary (`gatehouse validate`, `gatehouse run`,
//! `GATEHOUSE_*` overrides) and, for the finer points of error paths, through
//! `gatehouse::config::parse_str`.
mod support;

use std::path::{Path, PathBuf};

use gatehouse::config::{parse_str, ConfigError, Format};
use support::{http1_client, run_to_exit, Gateway, PATIENCE};

/// One mistake of each kind, every one in a different place. `pools[0]` fails to parse, so
/// `routes[0]` naming it must not add an "unknown pool" error.
const MANY_MISTAKES: &str = r#"
workers = "four"

[[listeners]]
name = "public"
bind = "127.0.0.1:0"

[[listeners]]
name = "public"
bind = "localhost:80"

[[listeners]]
name = "admin"
bind = "127.0.0.1:0"
colour = "blue"
[listeners.limits]
max_request_header_bytes = "64 KiBs"

[[pools]]
name = "web"
endpoints = ["127.0.0.1:9001"]
connect_timeout = "soon"

[[pools]]
name = "static"
endpoints = ["127.0.0.1:9002"]

[[routes]]
pool = "web"

[[routes]]
pool = "static"
max_request_body = "ten megs"

[[routes]]
pool = "api"

[[routes]]
[routes.match]
path_regex = "^/(unclosed"
[routes.direct_response]
body = "never"

[[routes]]
name = "no-action"
[routes.match]
path = "/nothing"

[[routes]]
priority = "high"
pool = "static"
"#;

/// Every error line of `MANY_MISTAKES`, in the order the operator should see them.
const MANY_MISTAKES_ERRORS: &[&str] = &[
    r#"workers: invalid type: string "four", expected a non-negative integer"#,
    r#"listeners[1].name: duplicate listener name "public""#,
    r#"listeners[1].bind: invalid address "localhost:80"; expected ip:port such as 127.0.0.1:8080 or [::]:443"#,
    "listeners[2].colour: unknown field `colour`, expected one of `name`, `bind`, `protocol`, `reuse_port`, `splice`, `max_connections`, `limits`, `firewall`, `proxy_protocol`, `tls`, `tcp`, `redirect_https`",
    r#"listeners[2].limits.max_request_header_bytes: invalid size "64 KiBs"; write it like "512", "64KiB" or "10MiB""#,
    r#"pools[0].connect_timeout: invalid duration "soon" (expected number at 0); write it like "30s", "250ms" or "1m 30s""#,
    r#"routes[1].max_request_body: invalid size "ten megs"; write it like "512", "64KiB" or "10MiB""#,
    r#"routes[2].pool: unknown pool "api""#,
    r#"routes[3].match.path_regex: invalid regex "^/(unclosed": unclosed group"#,
    "routes[4]: needs one of pool, redirect or direct_response",
    r#"routes[5].priority: invalid type: string "high", expected an integer between -2147483648 and 2147483647"#,
];

const VALID: &str = r#"
workers = 2
drain_timeout = "5s"

[[listeners]]
name = "public"
bind = "127.0.0.1:0"
[listeners.limits]
max_request_header_bytes = "32KiB"
request_header_timeout = "2s"

[[pools]]
name = "app"
endpoints = ["127.0.0.1:9001", { address = "app.internal:8080", weight = 3 }]
connect_timeout = "250ms"

[[routes]]
name = "api"
pool = "app"
max_request_body = "10MiB"
[routes.match]
hosts = ["*.example.com"]
path_prefix = "/api"
methods = ["GET", "POST"]
headers = [{ name = "x-tenant", regex = "^[a-z]+$" }]

[[routes]]
name = "health"
direct_response = { status = 200, body = "ok" }
[routes.match]
path = "/healthz"
"#;

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write config");
    path
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The error lines `gatehouse validate` / `run` printed after their one-line heading.
fn error_lines(stderr: &str) -> Vec<&str> {
    stderr.lines().skip(1).collect()
}

fn parse_toml(text: &str) -> Result<gatehouse::config::Config, Vec<ConfigError>> {
    parse_toml_env(text, &[])
}

fn parse_toml_env(
    text: &str,
    env: &[(&str, &str)],
) -> Result<gatehouse::config::Config, Vec<ConfigError>> {
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(name, value)| (name.to_string(), value.to_string()))
        .collect();
    parse_str(text, Format::Toml, env).map_err(|errors| errors.0)
}

/// `path: message` for each error, as an operator reads them.
fn rendered(errors: &[ConfigError]) -> Vec<String> {
    errors.iter().map(ToString::to_string).collect()
}

fn expect_errors(text: &str) -> Vec<String> {
    match parse_toml(text) {
        Ok(config) => panic!("config was accepted: {config:?}"),
        Err(errors) => rendered(&errors),
    }
}

const LISTENER: &str = "[[listeners]]\nname = \"public\"\nbind = \"127.0.0.1:0\"\n";

// ---------------------------------------------------------------------------------------
// Through the real binary.
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn validate_reports_every_mistake_with_its_path_in_file_order() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "bad.toml", MANY_MISTAKES);
    let output = run_to_exit(&["validate", file.to_str().unwrap()], &[]).await;
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "stderr:\n{stderr}");
    assert!(
        stderr.starts_with(&format!(
            "{}: {} error(s)\n",
            file.display(),
            MANY_MISTAKES_ERRORS.len()
        )),
        "heading:\n{stderr}"
    );
    assert_eq!(
        error_lines(&stderr),
        MANY_MISTAKES_ERRORS,
        "stderr:\n{stderr}"
    );
    assert!(
        !stderr.contains(r#"unknown pool "web""#),
        "a pool that failed to parse is still declared:\n{stderr}"
    );
    assert!(
        text(&output.stdout).is_empty(),
        "nothing on stdout: {:?}",
        text(&output.stdout)
    );
}

#[tokio::test]
async fn validate_accepts_a_valid_toml_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "good.toml", VALID);
    let output = run_to_exit(&["validate", file.to_str().unwrap()], &[]).await;
    assert!(
        output.status.success(),
        "status {:?}, stderr:\n{}",
        output.status,
        text(&output.stderr)
    );
    assert_eq!(
        text(&output.stdout),
        format!("{}: configuration is valid\n", file.display())
    );
}

#[tokio::test]
async fn validate_reports_a_toml_syntax_error_with_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "broken.toml",
        "[[listeners]]\nname = \"public\"\nbind = 127.0.0.1:80\n",
    );
    let output = run_to_exit(&["validate", file.to_str().unwrap()], &[]).await;
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "stderr:\n{stderr}");
    assert!(
        stderr.contains("invalid TOML") && stderr.contains("line 3"),
        "stderr:\n{stderr}"
    );
}

#[tokio::test]
async fn validate_accepts_json_and_reports_json_mistakes_with_paths() {
    let dir = tempfile::tempdir().unwrap();
    let good = write(
        dir.path(),
        "good.json",
        r#"{
            "workers": 2,
            "listeners": [{"name": "public", "bind": "127.0.0.1:0"}],
            "pools": [{"name": "app", "endpoints": ["127.0.0.1:9001"], "connect_timeout": "1s"}],
            "routes": [
                {"pool": "app", "match": {"path_prefix": "/api"}},
                {"direct_response": {"body": "hi"}}
            ]
        }"#,
    );
    let output = run_to_exit(&["validate", good.to_str().unwrap()], &[]).await;
    assert!(
        output.status.success(),
        "status {:?}, stderr:\n{}",
        output.status,
        text(&output.stderr)
    );

    let bad = write(
        dir.path(),
        "bad.json",
        r#"{
            "listeners": [{"name": "public", "bind": "127.0.0.1:0", "limits": {"max_uri_bytes": "huge"}}],
            "routes": [{"pool": "nowhere"}]
        }"#,
    );
    let output = run_to_exit(&["validate", bad.to_str().unwrap()], &[]).await;
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "stderr:\n{stderr}");
    assert_eq!(
        error_lines(&stderr),
        [
            r#"listeners[0].limits.max_uri_bytes: invalid size "huge"; write it like "512", "64KiB" or "10MiB""#,
            r#"routes[0].pool: unknown pool "nowhere""#,
        ],
        "stderr:\n{stderr}"
    );

    // JSON is parsed as JSON, not TOML: a TOML file named .json is a JSON syntax error.
    let toml_in_json = write(dir.path(), "wrong.json", VALID);
    let output = run_to_exit(&["validate", toml_in_json.to_str().unwrap()], &[]).await;
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "stderr:\n{stderr}");
    assert!(stderr.contains("invalid JSON"), "stderr:\n{stderr}");
}

#[tokio::test]
async fn run_serves_a_json_config() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "gatehouse.json",
        r#"{
            "listeners": [{"name": "public", "bind": "127.0.0.1:0"}],
            "routes": [{"direct_response": {"body": "from json"}}]
        }"#,
    );
    let gateway = Gateway::start_args(&["run", "--config", file.to_str().unwrap()], &[]);
    let response = http1_client()
        .get(gateway.url("public", "/"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.unwrap(), "from json");
}

#[tokio::test]
async fn run_refuses_an_invalid_file_and_never_binds() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "bad.toml", MANY_MISTAKES);
    let output = run_to_exit(
        &["run", "--config", file.to_str().unwrap()],
        &[("GATEHOUSE_LOG", "info")],
    )
    .await;
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "stderr:\n{stderr}");
    assert!(
        stderr.starts_with(&format!("{}: invalid configuration\n", file.display())),
        "stderr:\n{stderr}"
    );
    assert_eq!(
        error_lines(&stderr),
        MANY_MISTAKES_ERRORS,
        "stderr:\n{stderr}"
    );
    assert!(
        !stderr.contains("listener bound") && !stderr.contains("gatehouse ready"),
        "started despite errors:\n{stderr}"
    );
}

#[tokio::test]
async fn env_overrides_apply_to_validate_and_run() {
    let dir = tempfile::tempdir().unwrap();
    // Invalid on its own: the override supplies the bind address.
    let file = write(
        dir.path(),
        "gatehouse.toml",
        "workers = 1\n\n[[listeners]]\nname = \"public\"\nbind = \"set-by-env\"\n\n[[routes]]\ndirect_response = { body = \"env ok\" }\n",
    );
    let path = file.to_str().unwrap();

    let output = run_to_exit(&["validate", path], &[]).await;
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "stderr:\n{stderr}");
    assert!(
        stderr.contains(r#"listeners[0].bind: invalid address "set-by-env""#),
        "stderr:\n{stderr}"
    );

    let bind = [("GATEHOUSE_LISTENERS__0__BIND", "127.0.0.1:0")];
    let output = run_to_exit(&["validate", path], &bind).await;
    assert!(
        output.status.success(),
        "status {:?}, stderr:\n{}",
        output.status,
        text(&output.stderr)
    );

    let gateway = Gateway::start_args(
        &["run", "--config", path],
        &[bind[0], ("GATEHOUSE_WORKERS", "3")],
    );
    let started = gateway
        .stderr
        .wait_for(0, PATIENCE, |line| line.contains("runtime started"));
    assert!(
        started.contains("workers=3"),
        "GATEHOUSE_WORKERS=3 should beat workers = 1: {started}"
    );
    let response = http1_client()
        .get(gateway.url("public", "/"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.text().await.unwrap(), "env ok");
}

#[tokio::test]
async fn env_overrides_with_bad_values_name_the_variable() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "good.toml", VALID);
    let output = run_to_exit(
        &["validate", file.to_str().unwrap()],
        &[
            ("GATEHOUSE_WORKERS", "lots"),
            ("GATEHOUSE_LISTENERS__0__BIND", "nowhere"),
            ("GATEHOUSE_LISTENERS__4__BIND", "127.0.0.1:0"),
        ],
    )
    .await;
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "stderr:\n{stderr}");
    assert_eq!(
        error_lines(&stderr),
        [
            "env GATEHOUSE_LISTENERS__4__BIND: index 4 is past the end of a list of 1",
            r#"workers: invalid type: string "lots", expected a non-negative integer (set by environment variable GATEHOUSE_WORKERS)"#,
            r#"listeners[0].bind: invalid address "nowhere"; expected ip:port such as 127.0.0.1:8080 or [::]:443 (set by environment variable GATEHOUSE_LISTENERS__0__BIND)"#,
        ],
        "stderr:\n{stderr}"
    );

    // `run` refuses the same way.
    let output = run_to_exit(
        &["run", "--config", file.to_str().unwrap()],
        &[("GATEHOUSE_WORKERS", "0")],
    )
    .await;
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "stderr:\n{stderr}");
    assert_eq!(
        error_lines(&stderr),
        ["workers: must be between 1 and 1024 (set by environment variable GATEHOUSE_WORKERS)"],
        "stderr:\n{stderr}"
    );
}

// ---------------------------------------------------------------------------------------
// Library level: `parse_str`.
// ---------------------------------------------------------------------------------------

#[test]
fn the_valid_example_parses_with_units() {
    let config = parse_toml(VALID).expect("valid");
    assert_eq!(config.workers, Some(2));
    assert_eq!(config.drain_timeout.0 .0.as_secs(), 5);
    let limits = &config.listeners[0].limits;
    assert_eq!(limits.max_request_header_bytes.0, 32 * 1024);
    assert_eq!(limits.request_header_timeout.0.as_secs(), 2);
    assert_eq!(config.pools[0].connect_timeout.0.as_millis(), 250);
    assert_eq!(config.pools[0].endpoints[1].weight(), 3);
    assert_eq!(config.routes[0].max_request_body.unwrap().0, 10 << 20);
}

#[test]
fn nested_errors_carry_their_full_path() {
    let errors = expect_errors(
        r#"
[[listeners]]
name = "public"
bind = "127.0.0.1:0"
[listeners.limits]
max_request_header_bytes = "1KiB"
h2_initial_stream_window = 100

[[listeners]]
name = "other"
bind = "127.0.0.1:0"
[listeners.limits]
max_request_header_bytes = "lots"

[[pools]]
name = "app"
endpoints = ["127.0.0.1:1", { address = "no port", weight = 0 }, 5]

[[routes]]
pool = "app"
[routes.match]
hosts = ["*.ok.com", "bad host"]
methods = ["GET", "BAD METHOD"]
headers = [
  { name = "x-a", value = "1", present = true },
  { name = "bad header", present = true },
]
query = [{ name = "q", regex = "(" }]
[routes.redirect]
location = ""
status = 200
"#,
    );
    assert_eq!(
        errors,
        [
            "listeners[0].limits.max_request_header_bytes: must be at least 8192 bytes",
            "listeners[0].limits.h2_initial_stream_window: must be between 65535 and 2147483647 bytes",
            r#"listeners[1].limits.max_request_header_bytes: invalid size "lots"; write it like "512", "64KiB" or "10MiB""#,
            r#"pools[0].endpoints[2]: expected an endpoint: "host:port" or a table with `address` and `weight`"#,
            "routes[0]: pool, redirect and direct_response are mutually exclusive",
            "routes[0].redirect.status: must be one of 301, 302, 303, 307, 308",
            "routes[0].redirect.location: must not be empty",
            r#"routes[0].match.hosts[1]: "bad host" is not a host name; use an exact name or a leading wildcard such as "*.example.com""#,
            r#"routes[0].match.methods[1]: "BAD METHOD" is not a valid method"#,
            "routes[0].match.headers[0]: needs exactly one of value, regex or present",
            r#"routes[0].match.headers[1].name: "bad header" is not a valid header name"#,
            r#"routes[0].match.query[0].regex: invalid regex "(": unclosed group"#,
        ]
    );
}

#[test]
fn endpoint_address_and_weight_are_checked() {
    let errors = expect_errors(&format!(
        "{LISTENER}\n[[pools]]\nname = \"app\"\nendpoints = [\"127.0.0.1:1\", {{ address = \"no port\", weight = 0 }}]\n"
    ));
    assert_eq!(
        errors,
        [
            r#"pools[0].endpoints[1].address: invalid endpoint "no port"; expected host:port such as 10.0.0.5:8080 or app.internal:80"#,
            "pools[0].endpoints[1].weight: must be between 1 and 10000",
        ]
    );
}

#[test]
fn indexes_stay_true_when_earlier_elements_fail_to_parse() {
    let errors = expect_errors(
        r#"
[[listeners]]
name = "broken"
bind = "127.0.0.1:0"
protocol = "carrier-pigeon"

[[listeners]]
name = "public"
bind = "127.0.0.1"

[[pools]]
name = "broken"
endpoints = "127.0.0.1:1"

[[pools]]
name = "app"
endpoints = []

[[routes]]
pool = "app"
colour = "red"

[[routes]]
pool = "app"
timeouts = { response_header = "never" }

[[routes]]
pool = "missing"

[[routes]]
pool = "broken"
"#,
    );
    // The list of route fields grows with features; what matters here is the index.
    let errors: Vec<String> = errors
        .into_iter()
        .map(|error| match error.split_once(", expected one of") {
            Some((head, _)) if error.starts_with("routes[0].colour") => head.to_string(),
            _ => error,
        })
        .collect();
    assert_eq!(
        errors,
        [
            "listeners[0].protocol: unknown variant `carrier-pigeon`, expected one of `http`, `tls`, `tcp`",
            r#"listeners[1].bind: invalid address "127.0.0.1"; expected ip:port such as 127.0.0.1:8080 or [::]:443"#,
            r#"pools[0].endpoints: invalid type: string "127.0.0.1:1", expected a list"#,
            "pools[1].endpoints: at least one endpoint is required",
            "routes[0].colour: unknown field `colour`",
            r#"routes[1].timeouts.response_header: invalid duration "never" (expected number at 0); write it like "30s", "250ms" or "1m 30s""#,
            r#"routes[2].pool: unknown pool "missing""#,
        ]
    );
}

#[test]
fn one_element_reports_all_its_parse_errors() {
    // A bad required field, an unknown field and a bad optional field in one listener:
    // all three, and no "missing field" for the removed required one.
    let errors = expect_errors(
        r#"
[[listeners]]
name = 5
bind = "127.0.0.1:0"
colour = "blue"
max_connections = -1
[listeners.limits]
max_request_body = true
request_header_timeout = "5 fortnights"
"#,
    );
    assert_eq!(errors.len(), 5, "{errors:#?}");
    let expected_prefixes = [
        "listeners[0].colour: unknown field `colour`",
        "listeners[0].limits.max_request_body: expected a size such as \"10MiB\" or a whole number of bytes",
        "listeners[0].limits.request_header_timeout: invalid duration \"5 fortnights\"",
        "listeners[0].max_connections: invalid value: integer `-1`, expected an integer between 0 and 4294967295",
        "listeners[0].name: invalid type: integer `5`, expected a string",
    ];
    for prefix in expected_prefixes {
        assert!(
            errors.iter().any(|error| error.starts_with(prefix)),
            "no error starting with {prefix:?} in {errors:#?}"
        );
    }
    assert!(
        !errors.iter().any(|error| error.contains("missing field")),
        "{errors:#?}"
    );
    // The only listener failed to parse: that is not "no listeners".
    assert!(
        !errors
            .iter()
            .any(|error| error.contains("at least one listener")),
        "{errors:#?}"
    );
}

#[test]
fn missing_required_fields_and_sections_are_reported() {
    assert_eq!(
        expect_errors("[[listeners]]\nname = \"public\"\n"),
        ["listeners[0]: missing field `bind`"]
    );
    assert_eq!(
        expect_errors("workers = 2\n"),
        ["listeners: at least one listener is required"]
    );
    assert_eq!(
        expect_errors("listeners = \"public\"\n"),
        ["listeners: expected a list, found a string"]
    );
    assert_eq!(
        expect_errors(&format!(
            "{LISTENER}\n[[routes]]\nredirect = {{ status = 301 }}\n"
        )),
        ["routes[0].redirect: missing field `location`"]
    );
}

#[test]
fn duplicates_and_unknown_top_level_keys() {
    let errors = expect_errors(
        r#"
colour = "blue"

[[listeners]]
name = "a"
bind = "127.0.0.1:8080"

[[listeners]]
name = "b"
bind = "127.0.0.1:8080"

[[pools]]
name = "app"
endpoints = ["127.0.0.1:1"]

[[pools]]
name = "app"
endpoints = ["127.0.0.1:2"]

[[routes]]
name = "r"
direct_response = { body = "1" }

[[routes]]
name = "r"
direct_response = { body = "2", status = 99 }
"#,
    );
    assert_eq!(
        errors,
        [
            "colour: unknown field; expected one of workers, drain_timeout, log, access_log, metrics, tracing, http, tls, acme, firewall, watch_interval, demo, listeners, pools, routes, store, admin, bundles, pull",
            r#"listeners[1].bind: 127.0.0.1:8080 is already bound by listener "a""#,
            r#"pools[1].name: duplicate pool name "app""#,
            r#"routes[1].name: duplicate route name "r""#,
            "routes[1].direct_response.status: must be between 200 and 599",
        ]
    );
}

#[test]
fn syntax_errors_have_no_path_and_name_the_format() {
    let errors = parse_toml("[[listeners]\nname = 1").unwrap_err();
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0].path, "");
    assert!(
        errors[0].message.starts_with("invalid TOML: ") && errors[0].message.contains("line 1"),
        "{}",
        errors[0].message
    );
    let errors = parse_str("{\"listeners\": [}", Format::Json, Vec::new())
        .unwrap_err()
        .0;
    assert_eq!(errors.len(), 1);
    assert!(
        errors[0].message.starts_with("invalid JSON: "),
        "{}",
        errors[0].message
    );
}

#[test]
fn json_errors_have_the_same_paths_as_toml() {
    let errors = parse_str(
        r#"{"listeners": [{"name": "a", "bind": "127.0.0.1:0"}, {"name": "b", "bind": "x"}],
            "routes": [{"pool": 5}, {"pool": "none"}]}"#,
        Format::Json,
        Vec::new(),
    )
    .unwrap_err();
    assert_eq!(
        rendered(&errors.0),
        [
            r#"listeners[1].bind: invalid address "x"; expected ip:port such as 127.0.0.1:8080 or [::]:443"#,
            "routes[0].pool: invalid type: integer `5`, expected a string",
            r#"routes[1].pool: unknown pool "none""#,
        ]
    );
}

#[test]
fn env_overrides_set_scalars_and_list_elements() {
    let config = parse_toml_env(
        &format!("workers = 1\n{LISTENER}"),
        &[
            ("GATEHOUSE_WORKERS", "4"),
            ("GATEHOUSE_LISTENERS__0__BIND", "127.0.0.1:9999"),
            (
                "GATEHOUSE_LISTENERS__0__LIMITS__MAX_REQUEST_HEADER_BYTES",
                "16KiB",
            ),
            ("GATEHOUSE_DRAIN_TIMEOUT", "750ms"),
            ("GATEHOUSE_ACCESS_LOG__ENABLED", "false"),
            ("GATEHOUSE_LOG__LEVEL", "debug"),
            // Command-line settings and other variables are not overrides.
            ("GATEHOUSE_LOG", "not a config key"),
            ("GATEHOUSE_CONFIG", "/elsewhere.toml"),
            ("WORKERS", "99"),
        ],
    )
    .expect("valid");
    assert_eq!(config.workers, Some(4));
    assert_eq!(config.listeners[0].bind, "127.0.0.1:9999");
    assert_eq!(
        config.listeners[0].limits.max_request_header_bytes.0,
        16 * 1024
    );
    assert_eq!(config.drain_timeout.0 .0.as_millis(), 750);
    assert!(!config.access_log.enabled);
    assert_eq!(config.log.level, "debug");
}

#[test]
fn env_override_errors_name_the_variable() {
    let errors = parse_toml_env(
        LISTENER,
        &[
            ("GATEHOUSE_WORKERS", "many"),
            (
                "GATEHOUSE_LISTENERS__0__LIMITS__MAX_REQUEST_HEADER_BYTES",
                "1KiB",
            ),
            ("GATEHOUSE_LISTENERS__0__NAME__FIRST", "x"),
            ("GATEHOUSE_LISTENERS__X__BIND", "127.0.0.1:1"),
            ("GATEHOUSE_ROUTES__0__POOL", "app"),
            ("GATEHOUSE_NOPE", "1"),
            ("GATEHOUSE_HTTP__NOPE__DEEPER", "1"),
            ("GATEHOUSE___WORKERS", "1"),
        ],
    )
    .unwrap_err();
    assert_eq!(
        rendered(&errors),
        [
            r#"env GATEHOUSE_LISTENERS__0__NAME__FIRST: cannot set "first" inside a scalar value"#,
            r#"env GATEHOUSE_LISTENERS__X__BIND: "x" is not a list index"#,
            "env GATEHOUSE_ROUTES__0__POOL: index 0 is past the end of a list of 0",
            "env GATEHOUSE___WORKERS: empty path segment",
            "nope: unknown field; expected one of workers, drain_timeout, log, access_log, metrics, tracing, http, tls, acme, firewall, watch_interval, demo, listeners, pools, routes, store, admin, bundles, pull (set by environment variable GATEHOUSE_NOPE)",
            r#"workers: invalid type: string "many", expected a non-negative integer (set by environment variable GATEHOUSE_WORKERS)"#,
            "http.nope: unknown field `nope`, expected one of `x_forwarded_for`, `trusted_proxies`, `request_id_header`, `add_forwarded`, `add_via`, `hide_upstream_server`, `rate_limit` (set by environment variable GATEHOUSE_HTTP__NOPE__DEEPER)",
            "listeners[0].limits.max_request_header_bytes: must be at least 8192 bytes (set by environment variable GATEHOUSE_LISTENERS__0__LIMITS__MAX_REQUEST_HEADER_BYTES)",
        ]
    );
}

#[test]
fn errors_about_file_values_do_not_blame_the_environment() {
    let errors = parse_toml_env(
        "[[listeners]]\nname = \"public\"\nbind = \"nowhere\"\n[listeners.limits]\nmax_uri_bytes = 1\n",
        &[("GATEHOUSE_LISTENERS__0__NAME", "renamed")],
    )
    .unwrap_err();
    assert_eq!(
        rendered(&errors),
        [
            r#"listeners[0].bind: invalid address "nowhere"; expected ip:port such as 127.0.0.1:8080 or [::]:443"#,
            "listeners[0].limits.max_uri_bytes: must be at least 16 bytes",
        ]
    );
}

#[test]
fn resilience_settings_are_validated_with_field_paths() {
    let errors = expect_errors(&format!(
        r#"{LISTENER}
[[pools]]
name = "app"
endpoints = ["127.0.0.1:1"]
balancer = "consistent_hash"
hash = {{ on = "header" }}
panic_threshold = 150
health_check = {{ interval = "0s", path = "health", expected_status = [500, 200], unhealthy_threshold = 0 }}
outlier_detection = {{ consecutive_5xx = 0, base_ejection_time = "10s", max_ejection_time = "1s", max_ejection_percent = 101 }}
circuit_breaker = {{ error_percent = 0, min_requests = 0, open_for = "0s", half_open_probes = 0 }}
concurrency = {{ max_concurrent = 0, max_queue = 1, queue_timeout = "0s" }}
max_connections_per_endpoint = 2000000
connection_queue = {{ queue_timeout = "0s" }}
retry_budget = {{ percent = 200 }}

[[pools]]
name = "slow"
endpoints = ["127.0.0.1:1"]
outlier_detection = {{ consecutive_5xx = 0, latency_percent = 50, latency_min_requests = 0 }}

[[routes]]
pool = "app"
retry = {{ max_retries = 11, on = ["retriable_status"], statuses = [600], backoff_base = "1s", backoff_max = "10ms" }}
hedge = {{ delay = "0s" }}
circuit_breaker = {{ min_requests = 0 }}

[[routes]]
direct_response = {{ body = "x" }}
circuit_breaker = {{}}
"#
    ));
    assert_eq!(
        errors,
        [
            "pools[0].hash.name: required when hash.on is \"header\" or \"cookie\"",
            "pools[0].panic_threshold: must be between 0 and 100",
            "pools[0].health_check.interval: must be greater than zero",
            "pools[0].health_check.path: must be a path starting with \"/\"",
            "pools[0].health_check.expected_status: must be [low, high] with 100 <= low <= high <= 599",
            "pools[0].health_check.unhealthy_threshold: must be at least 1",
            "pools[0].outlier_detection.consecutive_5xx: must be at least 1 unless failure_percent or latency_percent is set",
            "pools[0].outlier_detection.max_ejection_time: must be at least base_ejection_time",
            "pools[0].outlier_detection.max_ejection_percent: must be between 0 and 100",
            "pools[0].circuit_breaker.error_percent: must be between 1 and 100",
            "pools[0].circuit_breaker.min_requests: must be at least 1",
            "pools[0].circuit_breaker.open_for: must be greater than zero",
            "pools[0].circuit_breaker.half_open_probes: must be at least 1",
            "pools[0].concurrency.max_concurrent: must be between 1 and 1000000",
            "pools[0].concurrency.queue_timeout: must be greater than zero",
            "pools[0].max_connections_per_endpoint: must be at most 1000000",
            "pools[0].connection_queue.queue_timeout: must be greater than zero",
            "pools[0].retry_budget.percent: must be between 0 and 100",
            "pools[1].outlier_detection.latency_percent: must be above 100 (a multiple of the pool's median latency)",
            "pools[1].outlier_detection.latency_min_requests: must be at least 1",
            "routes[0].retry.max_retries: must be at most 10",
            "routes[0].retry.statuses[0]: must be between 100 and 599",
            "routes[0].retry.backoff_max: must be at least backoff_base",
            "routes[0].circuit_breaker.min_requests: must be at least 1",
            "routes[0].hedge.delay: must be greater than zero",
            "routes[1].circuit_breaker: only routes that forward to a pool have a circuit breaker",
        ]
    );
}

#[test]
fn resilience_settings_round_trip_with_defaults() {
    let config = parse_toml(&format!(
        "{LISTENER}\n[[pools]]\nname = \"app\"\nendpoints = [\"127.0.0.1:1\", {{ address = \"127.0.0.1:2\", drain = true }}]\nbalancer = \"least_request\"\nhealth_check = {{ kind = \"tcp\" }}\n\n[[routes]]\npool = \"app\"\n"
    ))
    .expect("valid");
    let pool = &config.pools[0];
    assert!(pool.endpoints[1].draining());
    let check = pool.health_check.as_ref().expect("health_check");
    assert_eq!(check.interval.0, std::time::Duration::from_secs(5));
    assert_eq!(check.unhealthy_threshold, 3);
    assert_eq!(pool.panic_threshold, 50);
    assert_eq!(pool.passive_health.consecutive_failures, 5);
    assert_eq!(pool.retry_budget.percent, 20);
    assert_eq!(config.routes[0].retry.max_retries, 1);
}
