//! The harness works end to end: a real gateway process proxies to a real backend.
mod support;

use support::{echoed_header, http1_client, Backend, Gateway};

#[tokio::test]
async fn proxies_a_get_to_an_http1_backend() {
    let backend = Backend::echo().await;
    let gateway = Gateway::start(&support::config_with_pool(
        &[backend.addr],
        "[[routes]]\npool = \"app\"\n",
    ));
    let response = http1_client()
        .get(gateway.url("public", "/hello?a=1"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-backend"], "echo");
    let answer: serde_json::Value = response.json().await.unwrap();
    assert_eq!(answer["uri"], "/hello?a=1");
    assert_eq!(
        echoed_header(&answer, "x-forwarded-for"),
        vec!["127.0.0.1".to_string()]
    );
    let line = gateway.wait_access_log(|line| line["path"] == "/hello");
    assert_eq!(line["status"], 200);
}
