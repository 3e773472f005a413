//! The Web Messaging guest backend's client against the simulator's Guest API (no broker):
//! one session and one conversation per key whatever goes wrong on the way, and every frame a
//! server may send read without a panic.

use axum::extract::ws::{Message, WebSocketUpgrade};
use proptest::prelude::*;
use session_worker::config::{GenesysApi, Settings, WebMessagingStart};
use session_worker::genesys::web_messaging::{frames, session_token};
use session_worker::genesys::{Disposition, GenesysClient, GenesysError};
use session_worker::request::SessionRequest;
use session_worker::secret::Secret;
use session_worker::sim::{self, AuthMode, Faults, SimHandle, SimOptions};
use std::time::Duration;

const SECRET: &str = "guest-api-test-secret";

async fn sim_with(faults: Faults) -> SimHandle {
    sim::spawn(SimOptions {
        listen: "127.0.0.1:0".into(),
        faults,
        ..Default::default()
    })
    .await
    .expect("simulator starts")
}

fn settings_for(base: &str, ws: &str, tweak: impl FnOnce(&mut Settings)) -> Settings {
    let mut s = Settings::load_from(None, &Default::default()).unwrap();
    s.genesys.api = GenesysApi::WebMessaging;
    s.genesys.api_base_url = base.into();
    s.genesys.login_base_url = base.into();
    s.genesys.client_id = "local-client".into();
    s.genesys.client_secret = Secret::new("local-secret");
    s.genesys.deployment_id = "dep-1".into();
    s.genesys.web_messaging_url = ws.into();
    s.genesys.web_messaging_origin = "http://localhost".into();
    s.genesys.session_token_secret = Secret::new(SECRET);
    s.genesys.request_timeout = Duration::from_secs(2);
    tweak(&mut s);
    s
}

fn client_for(sim: &SimHandle, tweak: impl FnOnce(&mut Settings)) -> GenesysClient {
    let s = settings_for(&sim.base_url(), &format!("ws://{}/v1", sim.addr), tweak);
    s.validate_backend()
        .expect("web_messaging settings complete");
    GenesysClient::new(&s.genesys, 8).unwrap()
}

fn req(visitor: &str) -> SessionRequest {
    SessionRequest::parse(
        format!(r#"{{"visitor_id":"{visitor}","queue_id":"q","bot_score":0.5,"source":"s","attributes":{{"campaign":"spring"}}}}"#)
            .as_bytes(),
    )
    .unwrap()
}

fn token(key: &str) -> String {
    session_token(&Secret::new(SECRET), "dep-1", key)
}

#[tokio::test]
async fn a_key_opens_one_guest_session_and_a_second_call_finds_it() {
    let sim = sim_with(Faults::default()).await;
    let client = client_for(&sim, |_| {});
    let first = client.create_session(&req("v1"), "key-1").await.unwrap();
    let again = client.create_session(&req("v1"), "key-1").await.unwrap();
    assert_eq!(first.conversation_id, again.conversation_id);
    assert_eq!(
        first.message_id, again.message_id,
        "the same start was found"
    );
    assert!(first.message_id.is_some());
    assert_eq!(sim.sim.guest_session(&token("key-1")), (1, 1));
    let other = client.create_session(&req("v2"), "key-2").await.unwrap();
    assert_ne!(other.conversation_id, first.conversation_id);
    let s = sim.sim.stats().web_messaging;
    assert_eq!(
        (s.sessions, s.conversations, s.starts, s.resumed),
        (2, 2, 2, 1)
    );
}

#[tokio::test]
async fn a_socket_dropped_after_the_start_is_retried_without_a_second_start() {
    let sim = sim_with(Faults {
        ws_drop_after_start: true,
        ..Default::default()
    })
    .await;
    let client = client_for(&sim, |_| {});
    let err = client
        .create_session(&req("v"), "drop-1")
        .await
        .unwrap_err();
    assert_eq!(
        err.disposition(),
        Disposition::Retry { after: None },
        "never outcome_unknown: {err}"
    );
    let created = client.create_session(&req("v"), "drop-1").await.unwrap();
    assert!(!created.conversation_id.is_empty());
    assert_eq!(sim.sim.guest_session(&token("drop-1")), (1, 1));
    assert_eq!(sim.sim.stats().web_messaging.dropped_after_start, 1);
}

#[tokio::test]
async fn a_too_many_requests_frame_is_a_rate_limit_with_its_retry_after() {
    let sim = sim_with(Faults {
        ws_throttle_rate: 1.0,
        ..Default::default()
    })
    .await;
    let client = client_for(&sim, |_| {});
    let err = client.create_session(&req("v"), "slow").await.unwrap_err();
    assert_eq!(
        err.disposition(),
        Disposition::Retry {
            after: Some(Duration::from_secs(1))
        }
    );
    assert!(matches!(err, GenesysError::RateLimited { .. }), "{err}");
    assert_eq!(sim.sim.guest_session(&token("slow")), (0, 0));
}

#[tokio::test]
async fn a_refused_origin_is_a_configuration_failure_naming_the_fix() {
    let sim = sim_with(Faults {
        allowed_origin: "https://www.allowed.example".into(),
        ..Default::default()
    })
    .await;
    let client = client_for(&sim, |_| {});
    let err = client
        .create_session(&req("v"), "origin")
        .await
        .unwrap_err();
    assert_eq!(err.disposition(), Disposition::Auth);
    assert!(err.to_string().contains("allowed domains"), "{err}");
    assert!(client.probe().await.is_err());
    let mut faults = sim.sim.faults();
    faults.allowed_origin = "http://localhost".into();
    sim.sim.set_faults(faults);
    client
        .probe()
        .await
        .expect("the probe passes once the origin is allowed");
    client.create_session(&req("v"), "origin").await.unwrap();
}

#[tokio::test]
async fn a_refused_details_call_names_its_permission_and_the_retry_finds_the_start() {
    let sim = sim_with(Faults {
        auth: AuthMode::Forbidden,
        ..Default::default()
    })
    .await;
    let client = client_for(&sim, |_| {});
    let err = client.create_session(&req("v"), "perm").await.unwrap_err();
    assert_eq!(err.disposition(), Disposition::Auth);
    assert!(
        err.to_string().contains("conversation:message:view"),
        "{err}"
    );
    sim.sim.set_faults(Faults::default());
    client.create_session(&req("v"), "perm").await.unwrap();
    assert_eq!(sim.sim.guest_session(&token("perm")), (1, 1));
}

#[tokio::test]
async fn an_expired_session_is_opened_anew() {
    let sim = sim_with(Faults::default()).await;
    let client = client_for(&sim, |_| {});
    let first = client.create_session(&req("v"), "exp").await.unwrap();
    sim.sim.expire_guest_sessions();
    let second = client.create_session(&req("v"), "exp").await.unwrap();
    assert_ne!(first.conversation_id, second.conversation_id);
    assert_eq!(sim.sim.guest_session(&token("exp")), (2, 2));
}

#[tokio::test]
async fn custom_data_over_the_sessions_own_limit_is_refused_before_the_start() {
    let sim = sim_with(Faults::default()).await;
    // A configured limit above the session's: the session's 2048 bytes win.
    let client = client_for(&sim, |s| s.genesys.max_custom_data_bytes = 10_000);
    let big = format!(
        r#"{{"visitor_id":"v","queue_id":"q","attributes":{{"blob":"{}"}}}}"#,
        "x".repeat(3000)
    );
    let req = SessionRequest::parse(big.as_bytes()).unwrap();
    let err = client.create_session(&req, "big").await.unwrap_err();
    assert!(matches!(err, GenesysError::TooLarge { .. }), "{err}");
    assert_eq!(sim.sim.guest_session(&token("big")), (0, 0));
}

#[tokio::test]
async fn a_text_start_carries_the_configured_text() {
    let sim = sim_with(Faults::default()).await;
    let client = client_for(&sim, |s| {
        s.genesys.web_messaging_start = WebMessagingStart::Message;
        s.genesys.web_messaging_text = "Hello from the landing page".into();
    });
    client.create_session(&req("v"), "text").await.unwrap();
    assert_eq!(sim.sim.guest_session(&token("text")), (1, 1));
}

#[tokio::test]
async fn nothing_listening_is_a_retry_and_a_silent_server_a_timeout() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = closed.local_addr().unwrap();
    drop(closed);
    let s = settings_for("http://127.0.0.1:1", &format!("ws://{addr}/v1"), |_| {});
    let client = GenesysClient::new(&s.genesys, 1).unwrap();
    let err = client.create_session(&req("v"), "k").await.unwrap_err();
    assert_eq!(
        err.disposition(),
        Disposition::Retry { after: None },
        "{err}"
    );

    // A server that accepts the socket, sends hostile frames and never answers.
    let hostile = hostile_server().await;
    let s = settings_for("http://127.0.0.1:1", &format!("ws://{hostile}/v1"), |s| {
        s.genesys.request_timeout = Duration::from_millis(800);
    });
    let client = GenesysClient::new(&s.genesys, 1).unwrap();
    let err = client.create_session(&req("v"), "k").await.unwrap_err();
    assert_eq!(
        err.disposition(),
        Disposition::Retry { after: None },
        "{err}"
    );
}

/// Answers every frame with junk: not JSON, wrong types, unknown classes, binary, pings.
async fn hostile_server() -> std::net::SocketAddr {
    let app = axum::Router::new().route(
        "/v1",
        axum::routing::get(|ws: WebSocketUpgrade| async move {
            ws.on_upgrade(|mut socket| async move {
                let junk = [
                    "not json",
                    "[]",
                    "{}",
                    r#"{"class":"SessionResponse","code":200,"body":"x"}"#,
                    r#"{"class":"StructuredMessage","code":200,"body":{"id":7,"direction":[]}}"#,
                    r#"{"class":"Mystery","code":"two hundred","body":null,"tracingId":{}}"#,
                    r#"{"class":"JwtResponse","code":1e309,"body":{"jwt":null}}"#,
                ];
                while let Some(Ok(_)) = socket.recv().await {
                    for j in junk {
                        let _ = socket.send(Message::Text(j.into())).await;
                    }
                    let _ = socket.send(Message::Binary(vec![0xff; 64].into())).await;
                    let _ = socket.send(Message::Ping(vec![1, 2].into())).await;
                }
            })
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    addr
}

fn json_value() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<f64>().prop_map(|f| serde_json::json!(f)),
        "[a-zA-Z0-9 ]{0,12}".prop_map(serde_json::Value::from),
        prop_oneof![
            Just("SessionResponse"),
            Just("StructuredMessage"),
            Just("JwtResponse"),
            Just("TooManyRequestsErrorMessage"),
            Just("string"),
            Just("SessionExpiredEvent"),
        ]
        .prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
            prop::collection::hash_map(
                prop_oneof![
                    Just("class".to_string()),
                    Just("code".to_string()),
                    Just("body".to_string()),
                    Just("tracingId".to_string()),
                    Just("retryAfter".to_string()),
                    Just("newSession".to_string()),
                    Just("id".to_string()),
                    Just("direction".to_string()),
                    "[a-z]{1,6}",
                ],
                inner,
                0..5
            )
            .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn any_text_frame_is_read_without_a_panic(text in ".{0,200}") {
        let _ = frames::parse(&text);
    }

    #[test]
    fn any_json_frame_is_read_without_a_panic(v in json_value()) {
        let _ = frames::parse(&v.to_string());
    }
}
