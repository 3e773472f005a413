//! The real Genesys client against the simulator on a random port.

use session_worker::config::{GenesysApi, Settings};
use session_worker::genesys::{Disposition, GenesysClient, GenesysError};
use session_worker::request::SessionRequest;
use session_worker::sim::{self, AuthMode, Faults, SimHandle, SimOptions};
use std::time::Duration;

async fn sim_with(faults: Faults) -> SimHandle {
    sim::spawn(SimOptions {
        listen: "127.0.0.1:0".into(),
        faults,
        ..Default::default()
    })
    .await
    .expect("simulator starts")
}

fn client_for(sim: &SimHandle, tweak: impl FnOnce(&mut Settings)) -> GenesysClient {
    let mut s = Settings::load_from(None, &Default::default()).unwrap();
    s.genesys.api_base_url = sim.base_url();
    s.genesys.login_base_url = sim.base_url();
    s.genesys.client_id = "local-client".into();
    s.genesys.client_secret = session_worker::secret::Secret::new("local-secret");
    s.genesys.integration_id = "sim-integration".into();
    s.genesys.api = GenesysApi::Conversations;
    tweak(&mut s);
    GenesysClient::new(&s.genesys, 64).unwrap()
}

fn req(visitor: &str) -> SessionRequest {
    SessionRequest::parse(
        format!(r#"{{"visitor_id":"{visitor}","queue_id":"q","bot_score":0.5}}"#).as_bytes(),
    )
    .unwrap()
}

#[tokio::test]
async fn concurrent_creates_share_one_token_grant() {
    let sim = sim_with(Faults::default()).await;
    let client = client_for(&sim, |_| {});
    let mut tasks = Vec::new();
    for i in 0..50 {
        let c = client.clone();
        tasks.push(tokio::spawn(async move {
            c.create_session(&req(&format!("v{i}")), &format!("k{i}"))
                .await
        }));
    }
    for t in tasks {
        let created = t.await.unwrap().expect("session created");
        assert_eq!(created.status, 201);
        assert!(!created.conversation_id.is_empty());
        assert!(
            created.correlation_id.is_some(),
            "inin-correlation-id is captured"
        );
    }
    let stats = sim.sim.stats();
    assert_eq!(
        stats.token_grants, 1,
        "N concurrent creates cause one token grant"
    );
    assert_eq!(stats.sessions_created, 50);
}

#[tokio::test]
async fn an_absurd_token_lifetime_is_capped_not_a_panic() {
    let sim = sim::spawn(SimOptions {
        listen: "127.0.0.1:0".into(),
        token_ttl: Duration::from_secs(u64::MAX / 2),
        ..Default::default()
    })
    .await
    .unwrap();
    let client = client_for(&sim, |_| {});
    client
        .create_session(&req("a"), "a")
        .await
        .expect("session created");
    client
        .create_session(&req("b"), "b")
        .await
        .expect("cached token reused");
    assert_eq!(sim.sim.stats().token_grants, 1);
}

#[tokio::test]
async fn rate_limit_429_is_classified_with_its_delay() {
    let sim = sim_with(Faults {
        rate_limit_per_minute: 2,
        ..Default::default()
    })
    .await;
    let client = client_for(&sim, |_| {});
    client.create_session(&req("a"), "a").await.unwrap();
    let ok = client.create_session(&req("b"), "b").await.unwrap();
    assert_eq!(ok.rate_limit.allowed, Some(2));
    assert_eq!(ok.rate_limit.count, Some(2));
    let err = client.create_session(&req("c"), "c").await.unwrap_err();
    match err.disposition() {
        Disposition::Retry { after: Some(d) } => assert!(
            d >= Duration::from_secs(1) && d <= Duration::from_secs(60),
            "{d:?}"
        ),
        other => panic!("expected a retry with a delay, got {other:?} from {err}"),
    }
    assert!(
        matches!(err, GenesysError::RateLimited { ref code, .. } if code == "too.many.requests.retry.after")
    );
}

#[tokio::test]
async fn a_401_refreshes_the_token_exactly_once() {
    let sim = sim_with(Faults::default()).await;
    let client = client_for(&sim, |_| {});
    client.create_session(&req("a"), "a").await.unwrap();
    sim.sim.revoke_tokens();
    client
        .create_session(&req("b"), "b")
        .await
        .expect("refresh then success");
    let stats = sim.sim.stats();
    assert_eq!(stats.token_grants, 2);
    assert_eq!(stats.unauthorized, 1);

    // Tokens refused every time: one refresh, then an auth error (no loop).
    sim.sim.set_faults(Faults {
        auth: AuthMode::RevokeTokens,
        ..Default::default()
    });
    let err = client.create_session(&req("c"), "c").await.unwrap_err();
    assert_eq!(err.disposition(), Disposition::Auth);
    assert!(
        err.to_string().contains("conversation:messaging:write"),
        "{err}"
    );
    assert_eq!(sim.sim.stats().token_grants, 3);
}

#[tokio::test]
async fn wrong_client_secret_is_an_auth_error() {
    let sim = sim_with(Faults::default()).await;
    let client = client_for(&sim, |s| {
        s.genesys.client_secret = session_worker::secret::Secret::new("wrong")
    });
    let err = client.create_session(&req("a"), "a").await.unwrap_err();
    assert_eq!(err.disposition(), Disposition::Auth);
    assert!(
        !err.to_string().contains("wrong"),
        "the secret never appears in errors"
    );
}

#[tokio::test]
async fn server_errors_and_bad_bodies_are_classified() {
    let sim = sim_with(Faults {
        fail_rate: 1.0,
        ..Default::default()
    })
    .await;
    let client = client_for(&sim, |_| {});
    let err = client.create_session(&req("a"), "a").await.unwrap_err();
    assert_eq!(err.disposition(), Disposition::Retry { after: None });
    assert_eq!(err.status(), Some(503));

    let sim = sim_with(Faults {
        reject_queues: vec!["q".into()],
        ..Default::default()
    })
    .await;
    let client = client_for(&sim, |_| {});
    let err = client.create_session(&req("a"), "a").await.unwrap_err();
    assert_eq!(err.disposition(), Disposition::Permanent);
    assert_eq!(err.status(), Some(404));
}

#[tokio::test]
async fn unreachable_api_is_retryable() {
    let client = {
        let mut s = Settings::load_from(None, &Default::default()).unwrap();
        s.genesys.api_base_url = "http://127.0.0.1:9".into();
        s.genesys.login_base_url = "http://127.0.0.1:9".into();
        GenesysClient::new(&s.genesys, 1).unwrap()
    };
    let err = client.create_session(&req("a"), "a").await.unwrap_err();
    assert_eq!(
        err.disposition(),
        Disposition::Retry { after: None },
        "{err}"
    );
}

#[tokio::test]
async fn open_messaging_backend_creates_sessions() {
    let sim = sim_with(Faults::default()).await;
    let client = client_for(&sim, |s| s.genesys.api = GenesysApi::OpenMessaging);
    let created = client
        .create_session(&req("om-1"), "key-om-1")
        .await
        .unwrap();
    assert_eq!(created.status, 202);
    assert!(!created.conversation_id.is_empty());
    assert_eq!(sim.sim.sessions_for("om-1"), 1);

    let client = client_for(&sim, |s| {
        s.genesys.api = GenesysApi::OpenMessaging;
        s.genesys.integration_id = "no-such-integration".into();
    });
    let err = client
        .create_session(&req("om-2"), "key-om-2")
        .await
        .unwrap_err();
    assert_eq!(err.disposition(), Disposition::Permanent);
    assert_eq!(err.status(), Some(404));
    assert!(err.to_string().contains("no-such-integration"), "{err}");
}

/// A server whose session endpoint redirects to `target`, counting what reaches `target`.
async fn redirecting_to(sim: &SimHandle, status: u16) -> String {
    let target = format!("{}/api/v2/conversations/messaging", sim.base_url());
    let login = sim.base_url();
    let app = axum::Router::new()
        .route(
            "/oauth/token",
            axum::routing::post(move || {
                let login = login.clone();
                async move {
                    (
                        axum::http::StatusCode::TEMPORARY_REDIRECT,
                        [("location", format!("{login}/oauth/token"))],
                    )
                }
            }),
        )
        .fallback(move || {
            let target = target.clone();
            async move {
                (
                    axum::http::StatusCode::from_u16(status).unwrap(),
                    [("location", target)],
                )
            }
        });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

#[tokio::test]
async fn redirects_are_never_followed_with_a_visitors_data() {
    let sim = sim_with(Faults::default()).await;
    for status in [302, 307, 308] {
        let redirector = redirecting_to(&sim, status).await;
        // The session endpoint redirects: a permanent error naming where, nothing sent there.
        let client = client_for(&sim, |s| s.genesys.api_base_url = redirector.clone());
        let err = client.create_session(&req("r"), "r").await.unwrap_err();
        assert_eq!(err.disposition(), Disposition::Permanent, "{status}: {err}");
        assert!(err.to_string().contains("never followed"), "{err}");
        // The token endpoint redirects: the client credentials are not re-sent either.
        let client = client_for(&sim, |s| s.genesys.login_base_url = redirector.clone());
        assert!(client.create_session(&req("t"), "t").await.is_err());
    }
    let stats = sim.sim.stats();
    assert_eq!(
        stats.session_requests, 0,
        "no session body reached the redirect target"
    );
    assert_eq!(
        stats.token_grants, 3,
        "one grant per client with a direct login; none through a redirect"
    );
}
