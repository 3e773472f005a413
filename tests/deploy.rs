//! `make deploy-check`: every manifest and the compose file parse, and reference only config keys,
//! ports, paths and queues that exist.

use serde::Deserialize;
use serde_norway::Value;
use session_worker::config::{Settings, SECRET_ENV};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn yaml_docs(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_norway::Deserializer::from_str(&text)
        .map(|doc| {
            Value::deserialize(doc)
                .unwrap_or_else(|e| panic!("{} does not parse: {e}", path.display()))
        })
        .collect()
}

fn all_yaml() -> Vec<(PathBuf, Value)> {
    let mut out = Vec::new();
    let mut dirs = vec![root().join("deploy")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let p = entry.unwrap().path();
            if p.is_dir() {
                dirs.push(p);
            } else if matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")) {
                for doc in yaml_docs(&p) {
                    out.push((p.clone(), doc));
                }
            }
        }
    }
    assert!(out.len() >= 8, "deploy/ has its manifests");
    out
}

fn kind(doc: &Value) -> &str {
    doc.get("kind").and_then(Value::as_str).unwrap_or("")
}

/// `SESSION_WORKER__AMQP__URL` -> ["amqp", "url"]
fn key_path(var: &str) -> Vec<String> {
    var.trim_start_matches("SESSION_WORKER__")
        .split("__")
        .map(|s| s.to_ascii_lowercase())
        .collect()
}

fn config_has_key(path: &[String]) -> bool {
    let s = Settings::load_from(None, &HashMap::new()).unwrap();
    let text = toml::to_string(&s).unwrap();
    let table: toml::Table = text.parse().unwrap();
    let mut cur = toml::Value::Table(table);
    for part in path {
        match cur.get(part) {
            Some(v) => cur = v.clone(),
            None => return false,
        }
    }
    true
}

/// Every environment variable name a manifest sets, with its plain value if it has one.
fn env_vars(doc: &Value, out: &mut Vec<(String, Option<String>)>) {
    match doc {
        Value::Mapping(m) => {
            if let (Some(Value::String(name)), true) = (
                m.get("name"),
                m.contains_key("value") || m.contains_key("valueFrom"),
            ) {
                out.push((
                    name.clone(),
                    m.get("value").and_then(Value::as_str).map(str::to_string),
                ));
            }
            for (k, v) in m {
                if k.as_str() == Some("environment") || k.as_str() == Some("stringData") {
                    if let Value::Mapping(envs) = v {
                        for (name, value) in envs {
                            if let Some(name) = name.as_str() {
                                out.push((name.to_string(), value.as_str().map(str::to_string)));
                            }
                        }
                    }
                }
                env_vars(v, out);
            }
        }
        Value::Sequence(s) => s.iter().for_each(|v| env_vars(v, out)),
        _ => {}
    }
}

#[test]
fn manifests_reference_only_existing_config_keys_and_variables() {
    let allowed_plain: Vec<&str> = SECRET_ENV
        .iter()
        .map(|(v, _)| *v)
        .chain(["LOG_FORMAT", "RUST_LOG"])
        .collect();
    let mut seen = 0;
    for (path, doc) in all_yaml() {
        let mut vars = Vec::new();
        env_vars(&doc, &mut vars);
        for (name, value) in vars {
            seen += 1;
            if name.starts_with("SESSION_WORKER__") {
                assert!(
                    config_has_key(&key_path(&name)),
                    "{}: {name} names no config key",
                    path.display()
                );
                if let Some(v) = value.filter(|v| !v.is_empty() && !v.contains("USER")) {
                    let env: HashMap<String, String> = [(name.clone(), v)].into();
                    Settings::load_from(None, &env)
                        .unwrap_or_else(|e| panic!("{}: {name}: {e}", path.display()));
                }
            } else {
                assert!(
                    allowed_plain.contains(&name.as_str()),
                    "{}: unknown variable {name}",
                    path.display()
                );
            }
        }
    }
    assert!(seen > 10);
}

fn production_settings() -> Settings {
    let docs = yaml_docs(&root().join("deploy/k8s/base/configmap.yaml"));
    let toml_text = docs[0]["data"]["production.toml"]
        .as_str()
        .expect("production.toml in the ConfigMap");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("production.toml");
    std::fs::write(&path, toml_text).unwrap();
    Settings::load_from(Some(&path), &HashMap::new()).expect("the ConfigMap's config is valid")
}

#[test]
fn statefulset_probes_ports_and_grace_match_the_config() {
    let settings = production_settings();
    let port: u16 = settings
        .http
        .listen
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let sts = yaml_docs(&root().join("deploy/k8s/base/statefulset.yaml")).remove(0);
    assert_eq!(kind(&sts), "StatefulSet");
    let pod = &sts["spec"]["template"]["spec"];
    let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
    assert!(
        grace > settings.worker.shutdown_grace.as_secs(),
        "terminationGracePeriodSeconds above worker.shutdown_grace"
    );
    let c = &pod["containers"][0];
    assert_eq!(
        c["ports"][0]["containerPort"].as_u64(),
        Some(u64::from(port))
    );
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    let args: Vec<&str> = c["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(
        args[..2],
        ["--config", "/etc/session-worker/production.toml"]
    );
    let mount = c["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "data")
        .unwrap();
    assert!(
        settings
            .store
            .path
            .starts_with(mount["mountPath"].as_str().unwrap()),
        "the store is on the volume"
    );
    assert!(sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data");
}

#[test]
fn keda_scales_on_the_inbound_queue_and_compose_wires_the_stack() {
    let defaults = Settings::load_from(None, &HashMap::new()).unwrap();
    let keda = yaml_docs(&root().join("deploy/k8s/base/keda-scaledobject.yaml"));
    let so = keda.iter().find(|d| kind(d) == "ScaledObject").unwrap();
    assert_eq!(
        so["spec"]["triggers"][0]["metadata"]["queueName"].as_str(),
        Some(defaults.amqp.inbound_queue.as_str())
    );
    assert_eq!(so["spec"]["scaleTargetRef"]["kind"], "StatefulSet");

    let compose = yaml_docs(&root().join("deploy/compose.yaml")).remove(0);
    let services = &compose["services"];
    let worker = &services["worker"];
    let cmd: Vec<&str> = worker["command"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        root().join(cmd[1]).exists(),
        "compose points at an existing config file {}",
        cmd[1]
    );
    let env = &worker["environment"];
    let listen = env["SESSION_WORKER__HTTP__LISTEN"].as_str().unwrap();
    let port = listen.rsplit(':').next().unwrap();
    assert!(worker["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .any(|p| p.as_str().unwrap().ends_with(&format!(":{port}"))));
    // The production image has no simulator; compose builds the sim service's with it.
    assert_eq!(
        services["sim"]["build"]["args"]["FEATURES"].as_str(),
        Some("sim")
    );
    assert!(worker["build"]["args"]["FEATURES"].is_null());
    let dockerfile = std::fs::read_to_string(root().join("deploy/Dockerfile")).unwrap();
    assert!(dockerfile.contains("--no-default-features --features \"$FEATURES\""));
    let sim_cmd: Vec<&str> = services["sim"]["command"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let sim_port = sim_cmd.last().unwrap().rsplit(':').next().unwrap();
    assert!(env["SESSION_WORKER__GENESYS__API_BASE_URL"]
        .as_str()
        .unwrap()
        .ends_with(&format!(":{sim_port}")));
    assert!(env["SESSION_WORKER__GENESYS__WEB_MESSAGING_URL"]
        .as_str()
        .unwrap()
        .ends_with(&format!(":{sim_port}/v1")));
    assert!(env["SESSION_WORKER__AMQP__URL"]
        .as_str()
        .unwrap()
        .contains("@rabbitmq:5672"));
}

#[test]
fn the_configmap_and_the_secret_template_complete_the_web_messaging_backend() {
    let mut settings = production_settings();
    let secret = yaml_docs(&root().join("deploy/k8s/base/secret.template.yaml")).remove(0);
    let value = secret["stringData"]["GENESYS_SESSION_TOKEN_SECRET"]
        .as_str()
        .expect("the Secret template carries GENESYS_SESSION_TOKEN_SECRET");
    settings.genesys.session_token_secret = session_worker::secret::Secret::new(value);
    assert_eq!(
        settings.genesys.api,
        session_worker::config::GenesysApi::WebMessaging
    );
    settings
        .validate_backend()
        .expect("the manifests give web_messaging all it needs");
}

#[test]
fn dockerfile_runs_as_non_root_with_the_store_on_a_volume() {
    let text = std::fs::read_to_string(root().join("deploy/Dockerfile")).unwrap();
    assert!(text.contains("USER 10001"), "non-root user");
    assert!(text.contains("VOLUME [\"/data\"]"));
    assert!(text.contains("SESSION_WORKER__STORE__PATH=/data/"));
    assert!(text.contains("EXPOSE 9464"));
    for copied in ["Cargo.toml", "Cargo.lock", "src", "config", "benches"] {
        assert!(
            root().join(copied).exists(),
            "Dockerfile copies {copied}, which must exist"
        );
    }
}

#[test]
fn the_pod_meets_the_restricted_profile_and_only_the_metrics_port_is_open() {
    let sts = yaml_docs(&root().join("deploy/k8s/base/statefulset.yaml")).remove(0);
    let pod = &sts["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    let c = &pod["containers"][0]["securityContext"];
    assert_eq!(c["allowPrivilegeEscalation"], false);
    assert_eq!(c["readOnlyRootFilesystem"], true);
    assert_eq!(c["capabilities"]["drop"][0], "ALL");
    assert_eq!(c["seccompProfile"]["type"], "RuntimeDefault");

    let policy = yaml_docs(&root().join("deploy/k8s/base/networkpolicy.yaml")).remove(0);
    assert_eq!(kind(&policy), "NetworkPolicy");
    let ports: Vec<u64> = policy["spec"]["ingress"]
        .as_sequence()
        .unwrap()
        .iter()
        .flat_map(|rule| rule["ports"].as_sequence().cloned().unwrap_or_default())
        .filter_map(|p| p["port"].as_u64())
        .collect();
    let port: u64 = production_settings()
        .http
        .listen
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(ports, vec![port], "only http.listen's port is let in");
    let kustomization =
        std::fs::read_to_string(root().join("deploy/k8s/base/kustomization.yaml")).unwrap();
    assert!(kustomization.contains("networkpolicy.yaml"));
}
