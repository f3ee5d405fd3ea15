//! Deployments against external nats-servers (issue 16). One wants a user and password:
//! `tandem serve` with the credentials in its environment serves, the password is on no
//! command line and in no log line; without the password, or with a wrong one, the deployment
//! does not start, and says why. One speaks only TLS, with a CA made in the test.
//!
//! Needs `$TANDEM_TEST_MODELS/tiny`, nats-server and the workspace binaries.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::json;
use support::tandem;
use tandem_test_kit::{
    Http, Nats, Proc, assert_no_command_line_shows, free_port, model_dir, temp_dir,
};

const PASSWORD: &str = "pw-s3cret-5a1e";

/// A deployment config in `dir`: one CPU worker of the tiny model served as `name` on a free
/// port, joining the NATS server at `nats_url`; returns the file and the port.
fn deploy_config(dir: &Path, name: &str, nats_url: &str) -> (PathBuf, u16) {
    let port = free_port();
    let config = dir.join("deploy.yaml");
    std::fs::write(
        &config,
        format!(
            "model: {model}\nport: {port}\nserved_model_name: {name}\nnats: {{ url: \"{nats_url}\" }}\n\
             context_servers: {{ num_instances: 0 }}\n\
             generation_servers: {{ num_instances: 1, device: cpu }}\n",
            model = model_dir("tiny").display(),
        ),
    )
    .unwrap();
    (config, port)
}

/// `tandem serve -c config` with `env` added to its environment (which its children inherit).
fn launcher(config: &Path, env: &[(&str, &str)]) -> Proc {
    let mut command = tandem();
    command
        .envs(env.iter().copied())
        .args([
            "serve",
            "--ready-timeout-s",
            "60",
            "--shutdown-grace-s",
            "20",
            "-c",
        ])
        .arg(config);
    Proc::spawn("tandem", command)
}

#[test]
fn an_external_nats_with_user_and_password() {
    let dir = temp_dir("nats-user-password");
    let nats = Nats::start_with_config(
        &dir,
        &format!("authorization {{ users: [ {{ user: \"svc\", password: \"{PASSWORD}\" }} ] }}"),
    );
    let (config, port) = deploy_config(&dir, "authed", &nats.url);

    let mut serving = launcher(
        &config,
        &[
            ("TANDEM_NATS_USER", "svc"),
            ("TANDEM_NATS_PASSWORD", PASSWORD),
        ],
    );
    serving.wait_for_line("tandem: serving", Duration::from_secs(120));
    let reply = Http::new(&format!("http://127.0.0.1:{port}")).post(
        "/v1/completions",
        &json!({"model": "authed", "prompt": "Hi", "max_tokens": 2}),
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_no_command_line_shows(serving.pid(), PASSWORD);
    serving.signal(libc::SIGTERM);
    assert!(serving.wait_exit(Duration::from_secs(60)).success());
    assert!(
        !serving.output().contains(PASSWORD),
        "a log line shows the password"
    );

    // Without the password, or with a wrong one, nothing connects: the deployment stops,
    // saying why.
    let mut missing = launcher(&config, &[("TANDEM_NATS_USER", "svc")]);
    assert!(!missing.wait_exit(Duration::from_secs(90)).success());
    let out = missing.output();
    assert!(
        out.contains("needs a password") && out.contains("TANDEM_NATS_PASSWORD"),
        "{out}"
    );
    let mut wrong = launcher(
        &config,
        &[
            ("TANDEM_NATS_USER", "svc"),
            ("TANDEM_NATS_PASSWORD", "pw-wrong"),
        ],
    );
    assert!(!wrong.wait_exit(Duration::from_secs(90)).success());
    let out = wrong.output();
    assert!(
        out.contains("cannot connect to NATS") && out.to_lowercase().contains("authorization"),
        "{out}"
    );
    drop(nats);
}

/// A CA, and a certificate it signs for 127.0.0.1 and localhost, as PEM files in `dir`:
/// (CA certificate, server certificate, server key).
fn test_ca(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let server_key = KeyPair::generate().unwrap();
    let server = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
        .unwrap()
        .signed_by(&server_key, &ca, &ca_key)
        .unwrap();
    let paths = (
        dir.join("ca.pem"),
        dir.join("server.pem"),
        dir.join("server.key"),
    );
    std::fs::write(&paths.0, ca.pem()).unwrap();
    std::fs::write(&paths.1, server.pem()).unwrap();
    std::fs::write(&paths.2, server_key.serialize_pem()).unwrap();
    paths
}

/// A deployment against an external nats-server that speaks only TLS, with a CA made here:
/// given the CA (`TANDEM_NATS_TLS_CA` in the launcher's environment, which its children
/// inherit) it serves; without it, nothing connects and the deployment stops.
#[test]
fn an_external_nats_over_tls_with_a_test_ca() {
    let dir = temp_dir("nats-tls");
    let (ca, cert, key) = test_ca(&dir);
    let nats = Nats::start_with_config(
        &dir,
        &format!(
            "tls {{ cert_file: \"{}\", key_file: \"{}\" }}",
            cert.display(),
            key.display()
        ),
    );
    let (config, port) = deploy_config(&dir, "tls", &nats.url);

    let ca = ca.to_str().expect("a UTF-8 temp path");
    let mut serving = launcher(&config, &[("TANDEM_NATS_TLS_CA", ca)]);
    serving.wait_for_line("tandem: serving", Duration::from_secs(120));
    let reply = Http::new(&format!("http://127.0.0.1:{port}")).post(
        "/v1/completions",
        &json!({"model": "tls", "prompt": "Hi", "max_tokens": 2}),
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    serving.signal(libc::SIGTERM);
    assert!(serving.wait_exit(Duration::from_secs(60)).success());

    let mut refused = launcher(&config, &[]);
    assert!(!refused.wait_exit(Duration::from_secs(90)).success());
    assert!(
        refused.output().contains("cannot connect to NATS"),
        "{}",
        refused.output()
    );
    drop(nats);
}
