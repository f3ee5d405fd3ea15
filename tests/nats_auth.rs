//! Deployments against external nats-servers. One wants a user and password:
//! `tandem serve` with the credentials in its environment serves, the password is on no
//! command line and in no log line; without the password, or with a wrong one, the deployment
//! does not start, and says why. One wants an NKey (the seed in a file), one speaks only TLS
//! with a CA made in the test, one also verifies client certificates. One has a user per
//! component with least-privilege subject permissions (examples/nats/permissions.conf).
//!
//! Needs `$TANDEM_TEST_MODELS/tiny`, nats-server and the workspace binaries.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::json;
use support::tandem;
use tandem_test_kit::prometheus::metric;
use tandem_test_kit::{
    ApiServer, Http, Nats, Proc, WorkerSpec, assert_no_command_line_shows, free_port, model_dir,
    start_worker, temp_dir,
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

/// Runs the deployment of `config` with `env` until it serves, asks it for one completion of
/// `model` on `port` (200 expected), runs `check` on the running launcher, stops it and
/// returns its output.
fn serve_once(
    config: &Path,
    port: u16,
    model: &str,
    env: &[(&str, &str)],
    check: impl FnOnce(&Proc),
) -> String {
    let mut serving = launcher(config, env);
    serving.wait_for_line("tandem: serving", Duration::from_secs(120));
    let reply = Http::new(&format!("http://127.0.0.1:{port}")).post(
        "/v1/completions",
        &json!({"model": model, "prompt": "Hi", "max_tokens": 2}),
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    check(&serving);
    serving.signal(libc::SIGTERM);
    assert!(serving.wait_exit(Duration::from_secs(60)).success());
    serving.output()
}

/// The deployment of `config` with `env` does not start, and says it cannot reach NATS;
/// returns its output.
fn refused(config: &Path, env: &[(&str, &str)]) -> String {
    let mut launched = launcher(config, env);
    assert!(!launched.wait_exit(Duration::from_secs(90)).success());
    let out = launched.output();
    assert!(out.contains("cannot connect to NATS"), "{out}");
    out
}

#[test]
fn an_external_nats_with_user_and_password() {
    let dir = temp_dir("nats-user-password");
    let nats = Nats::start_with_config(
        &dir,
        &format!("authorization {{ users: [ {{ user: \"svc\", password: \"{PASSWORD}\" }} ] }}"),
    );
    let (config, port) = deploy_config(&dir, "authed", &nats.url);

    let credentials = [
        ("TANDEM_NATS_USER", "svc"),
        ("TANDEM_NATS_PASSWORD", PASSWORD),
    ];
    let out = serve_once(&config, port, "authed", &credentials, |serving| {
        assert_no_command_line_shows(serving.pid(), PASSWORD)
    });
    assert!(!out.contains(PASSWORD), "a log line shows the password");

    // Without the password, or with a wrong one, nothing connects: the deployment stops,
    // saying why.
    let mut missing = launcher(&config, &[("TANDEM_NATS_USER", "svc")]);
    assert!(!missing.wait_exit(Duration::from_secs(90)).success());
    let out = missing.output();
    assert!(
        out.contains("needs a password") && out.contains("TANDEM_NATS_PASSWORD"),
        "{out}"
    );
    let out = refused(
        &config,
        &[
            ("TANDEM_NATS_USER", "svc"),
            ("TANDEM_NATS_PASSWORD", "pw-wrong"),
        ],
    );
    assert!(out.to_lowercase().contains("authorization"), "{out}");
    drop(nats);
}

/// The PEM files of [`test_ca`].
struct TestCa {
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
}

/// A CA, a certificate it signs for 127.0.0.1 and localhost, and a client certificate it
/// signs, as PEM files in `dir`.
fn test_ca(dir: &Path) -> TestCa {
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
    let client_key = KeyPair::generate().unwrap();
    let client = CertificateParams::new(vec!["tandem-client".to_string()])
        .unwrap()
        .signed_by(&client_key, &ca, &ca_key)
        .unwrap();
    let files = TestCa {
        ca: dir.join("ca.pem"),
        server_cert: dir.join("server.pem"),
        server_key: dir.join("server.key"),
        client_cert: dir.join("client.pem"),
        client_key: dir.join("client.key"),
    };
    std::fs::write(&files.ca, ca.pem()).unwrap();
    std::fs::write(&files.server_cert, server.pem()).unwrap();
    std::fs::write(&files.server_key, server_key.serialize_pem()).unwrap();
    std::fs::write(&files.client_cert, client.pem()).unwrap();
    std::fs::write(&files.client_key, client_key.serialize_pem()).unwrap();
    files
}

/// A deployment against an external nats-server that speaks only TLS, with a CA made here:
/// given the CA (`TANDEM_NATS_TLS_CA` in the launcher's environment, which its children
/// inherit) it serves; without it, nothing connects and the deployment stops.
#[test]
fn an_external_nats_over_tls_with_a_test_ca() {
    let dir = temp_dir("nats-tls");
    let files = test_ca(&dir);
    let nats = Nats::start_with_config(
        &dir,
        &format!(
            "tls {{ cert_file: \"{}\", key_file: \"{}\" }}",
            files.server_cert.display(),
            files.server_key.display()
        ),
    );
    let (config, port) = deploy_config(&dir, "tls", &nats.url);

    let ca = files.ca.to_str().expect("a UTF-8 temp path");
    serve_once(&config, port, "tls", &[("TANDEM_NATS_TLS_CA", ca)], |_| {});
    refused(&config, &[]);
    drop(nats);
}

/// A deployment against a nats-server that verifies client certificates (`verify: true`):
/// with the client certificate and key of the test CA (`TANDEM_NATS_TLS_CERT`,
/// `TANDEM_NATS_TLS_KEY`) it serves; with the CA alone, the server refuses it.
#[test]
fn an_external_nats_that_verifies_client_certificates() {
    let dir = temp_dir("nats-mtls");
    let files = test_ca(&dir);
    let nats = Nats::start_with_config(
        &dir,
        &format!(
            "tls {{ cert_file: \"{}\", key_file: \"{}\", ca_file: \"{}\", verify: true }}",
            files.server_cert.display(),
            files.server_key.display(),
            files.ca.display()
        ),
    );
    let (config, port) = deploy_config(&dir, "mtls", &nats.url);
    let path = |p: &PathBuf| p.to_str().expect("a UTF-8 temp path").to_owned();
    let (ca, cert, key) = (
        path(&files.ca),
        path(&files.client_cert),
        path(&files.client_key),
    );
    let client = [
        ("TANDEM_NATS_TLS_CA", ca.as_str()),
        ("TANDEM_NATS_TLS_CERT", cert.as_str()),
        ("TANDEM_NATS_TLS_KEY", key.as_str()),
    ];
    serve_once(&config, port, "mtls", &client, |_| {});
    refused(&config, &[("TANDEM_NATS_TLS_CA", &ca)]);
    drop(nats);
}

/// A deployment against a nats-server whose user is an NKey: with the seed in a file
/// (`TANDEM_NATS_NKEY_FILE`) it serves, and the seed is on no command line and in no log
/// line; with another user's seed it is refused.
#[test]
fn an_external_nats_with_an_nkey() {
    let dir = temp_dir("nats-nkey");
    let user = nkeys::KeyPair::new_user();
    let nats = Nats::start_with_config(
        &dir,
        &format!(
            "authorization {{ users: [ {{ nkey: \"{}\" }} ] }}",
            user.public_key()
        ),
    );
    let (config, port) = deploy_config(&dir, "nkey", &nats.url);
    let seed = user.seed().unwrap();
    let seed_file = dir.join("user.nk");
    std::fs::write(&seed_file, &seed).unwrap();
    let seed_path = seed_file.to_str().expect("a UTF-8 temp path").to_owned();

    let out = serve_once(
        &config,
        port,
        "nkey",
        &[("TANDEM_NATS_NKEY_FILE", &seed_path)],
        |serving| assert_no_command_line_shows(serving.pid(), &seed),
    );
    assert!(!out.contains(&seed), "a log line shows the seed");

    let stranger = dir.join("stranger.nk");
    std::fs::write(&stranger, nkeys::KeyPair::new_user().seed().unwrap()).unwrap();
    let stranger = stranger.to_str().expect("a UTF-8 temp path").to_owned();
    refused(&config, &[("TANDEM_NATS_NKEY_FILE", &stranger)]);
    drop(nats);
}

/// A raw NATS client: connects to 127.0.0.1:`port` as `user`, publishes one message on
/// `subject`, and returns what the server answered up to the PONG of a PING sent after it
/// (a `-ERR 'Permissions Violation ...'` line when the user may not publish there).
fn publish_as(port: u16, user: &str, password: &str, subject: &str) -> String {
    use std::io::{BufRead, BufReader, Write};
    let stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut info = String::new();
    reader.read_line(&mut info).unwrap();
    assert!(info.starts_with("INFO"), "{info}");
    let connect = json!({"user": user, "pass": password, "verbose": false, "pedantic": false});
    let mut writer = stream;
    write!(
        writer,
        "CONNECT {connect}\r\nPUB {subject} 6\r\nforged\r\nPING\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap() == 0 {
            break;
        }
        answer.push_str(&line);
        if line.starts_with("PONG") || line.contains("Authorization Violation") {
            break;
        }
    }
    answer
}

/// The least-privilege users of `examples/nats/permissions.conf` (docs/security.md), for this
/// test's served name and with the passwords written in: an api-server, a context worker and
/// a decode worker, each connecting as its own user, serve a disaggregated request, and a
/// second api-server on the api-server's user finds the first's stored response, with no
/// permission violation in the nats-server's log; the decode worker's user cannot publish the
/// context worker's heartbeat or a job, and may publish on a request's stream.
#[test]
fn least_privilege_users_serve_and_cannot_pose_as_another_worker() {
    let dir = temp_dir("nats-permissions");
    let served = "perm-test";
    let passwords = [
        ("api", "pw-api-1f"),
        ("ctx-a", "pw-ctx-2e"),
        ("dec-a", "pw-dec-3d"),
    ];
    let example = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/nats/permissions.conf"),
    )
    .unwrap();
    let config = example
        .replace("llama-3_1-8b", served)
        .replace(
            "$TANDEM_API_NATS_PASSWORD",
            &format!("\"{}\"", passwords[0].1),
        )
        .replace(
            "$TANDEM_CTX_A_NATS_PASSWORD",
            &format!("\"{}\"", passwords[1].1),
        )
        .replace(
            "$TANDEM_DEC_A_NATS_PASSWORD",
            &format!("\"{}\"", passwords[2].1),
        );
    let nats = Nats::start_with_config(&dir, &config);
    let password_file = |user: &str, password: &str| {
        let path = dir.join(format!("{user}.password"));
        std::fs::write(&path, password).unwrap();
        path.display().to_string()
    };
    let files: Vec<String> = passwords
        .iter()
        .map(|(user, password)| password_file(user, password))
        .collect();
    let model = model_dir("tiny");
    let worker = |role: &'static str, id: &'static str, file: &str| {
        let extra = ["--nats-user", id, "--nats-password-file", file];
        let spec = WorkerSpec {
            role,
            worker_id: id,
            served_model_name: served,
            threads: 1,
            heartbeat_ms: 200,
            extra: &extra,
        };
        start_worker(&nats.url, &model, &spec)
    };
    let _context = worker("context", "ctx-a", &files[1]);
    let _decode = worker("decode", "dec-a", &files[2]);
    let api = ApiServer::start(
        &nats,
        &model,
        served,
        &[
            "--nats-user",
            "api",
            "--nats-password-file",
            &files[0],
            // Every prompt is prefilled by the context worker.
            "--max-local-prefill-length",
            "0",
        ],
    );
    api.http
        .wait_for_role("context", 1, Duration::from_secs(30));
    api.http.wait_for_role("decode", 1, Duration::from_secs(30));
    let reply = api.http.post(
        "/v1/completions",
        &json!({"model": served, "prompt": "Hello there", "max_tokens": 4}),
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    let metrics = api.http.get("/metrics").body;
    assert_eq!(
        metric(&metrics, "tandem_requests_disaggregated_total", ""),
        Some(1.0),
        "the context worker prefilled it and the decode worker pulled it: {metrics}"
    );

    // A second api-server on the same user finds the first's stored response through it.
    let second_api = ApiServer::start(
        &nats,
        &model,
        served,
        &["--nats-user", "api", "--nats-password-file", &files[0]],
    );
    let stored = api.http.post(
        "/v1/responses",
        &json!({"model": served, "input": "Hello there", "max_output_tokens": 2}),
    );
    assert_eq!(stored.status, 200, "{}", stored.body);
    let id = stored.json()["id"].as_str().unwrap().to_string();
    let found = second_api.http.get(&format!("/v1/responses/{id}"));
    assert_eq!(found.status, 200, "{}", found.body);
    assert_eq!(found.json()["id"], id.as_str());
    // Everything the components did was allowed: the example's permissions cover it all
    // (KV events and snapshots, stored responses' request-reply).
    let log = nats.output();
    assert!(
        !log.contains("Violation"),
        "the example's permissions refused something a component does:\n{log}"
    );
    let (user, password) = passwords[2];
    let heartbeat = format!("tandem.{served}.heartbeat.context.ctx-a");
    let job = format!("tandem.{served}.prefill.ctx-a");
    for forbidden in [&heartbeat, &job] {
        let answer = publish_as(nats.port, user, password, forbidden);
        assert!(
            answer.contains("Permissions Violation for Publish"),
            "{user} published on {forbidden}: {answer}"
        );
    }
    let stream = format!("tandem.{served}.stream.nobody");
    let answer = publish_as(nats.port, user, password, &stream);
    assert!(
        answer.contains("PONG") && !answer.contains("-ERR"),
        "{user} may publish on a stream: {answer}"
    );
}
