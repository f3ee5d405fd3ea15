//! How a component authenticates to NATS, the way NATS users configure it: a `.creds` file
//! (JWT and NKey seed), an NKey seed file, a user and password, or a token; and TLS (a CA, a
//! client certificate, TLS required). Secrets come from a file or the environment, never
//! from the command line (every local user can read it in `ps`): the password only from
//! `TANDEM_NATS_PASSWORD` or `--nats-password-file`, the token only from `TANDEM_NATS_TOKEN` or
//! `--nats-token-file`. The paths and the user name are not secrets and do travel as flags.

use std::path::{Path, PathBuf};

use clap::Args;

use super::Argv;

/// The environment variable of the token (the launcher hands its own nats-server's token to
/// its children this way).
pub const TOKEN_VAR: &str = "TANDEM_NATS_TOKEN";
/// The environment variable of the password for `--nats-user`.
pub const PASSWORD_VAR: &str = "TANDEM_NATS_PASSWORD";

/// NATS credentials and TLS settings shared by the worker and the api-server.
#[derive(Debug, Clone, Default, PartialEq, Args)]
#[command(next_help_heading = "NATS authentication")]
pub struct NatsAuthArgs {
    /// A NATS `.creds` file (user JWT and NKey seed).
    #[arg(long, env = "TANDEM_NATS_CREDS", value_name = "FILE")]
    pub nats_creds: Option<PathBuf>,
    /// A file holding an NKey seed (`SU...`).
    #[arg(long, env = "TANDEM_NATS_NKEY_FILE", value_name = "FILE")]
    pub nats_nkey_file: Option<PathBuf>,
    /// User name; its password comes from TANDEM_NATS_PASSWORD or --nats-password-file.
    #[arg(long, env = "TANDEM_NATS_USER", value_name = "USER")]
    pub nats_user: Option<String>,
    /// A file holding the password of --nats-user.
    #[arg(long, env = "TANDEM_NATS_PASSWORD_FILE", value_name = "FILE")]
    pub nats_password_file: Option<PathBuf>,
    /// A file holding a token (else TANDEM_NATS_TOKEN, if set).
    #[arg(long, env = "TANDEM_NATS_TOKEN_FILE", value_name = "FILE")]
    pub nats_token_file: Option<PathBuf>,
    /// CA certificate (PEM) to verify the server with; implies TLS.
    #[arg(long, env = "TANDEM_NATS_TLS_CA", value_name = "FILE")]
    pub nats_tls_ca: Option<PathBuf>,
    /// Client certificate (PEM), for servers that verify clients; with --nats-tls-key.
    #[arg(
        long,
        env = "TANDEM_NATS_TLS_CERT",
        value_name = "FILE",
        requires = "nats_tls_key"
    )]
    pub nats_tls_cert: Option<PathBuf>,
    /// Client certificate's private key (PEM).
    #[arg(
        long,
        env = "TANDEM_NATS_TLS_KEY",
        value_name = "FILE",
        requires = "nats_tls_cert"
    )]
    pub nats_tls_key: Option<PathBuf>,
    /// Refuse a connection that is not TLS.
    #[arg(long, env = "TANDEM_NATS_TLS_REQUIRED")]
    pub nats_tls_required: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum NatsAuthError {
    #[error("reading the NATS {what} from {path}: {source}")]
    Read {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("the NATS {what} file {path} is empty")]
    Empty { what: &'static str, path: String },
    #[error("--nats-user needs a password: set TANDEM_NATS_PASSWORD or --nats-password-file")]
    NoPassword,
    #[error("the NATS credentials file {path}: {detail}")]
    Creds { path: String, detail: String },
}

/// The credential a connection presents (at most one).
#[derive(Clone, PartialEq)]
enum Credential {
    Creds(PathBuf),
    NKey(String),
    UserPassword(String, String),
    Token(String),
}

impl NatsAuthArgs {
    /// The flags that make a child parse back to `self` (no secret is among them).
    pub(super) fn push_args(&self, argv: &mut Argv) {
        argv.push_some(
            "--nats-creds",
            self.nats_creds.as_ref().map(|p| p.display()),
        );
        argv.push_some(
            "--nats-nkey-file",
            self.nats_nkey_file.as_ref().map(|p| p.display()),
        );
        argv.push_some("--nats-user", self.nats_user.as_ref());
        argv.push_some(
            "--nats-password-file",
            self.nats_password_file.as_ref().map(|p| p.display()),
        );
        argv.push_some(
            "--nats-token-file",
            self.nats_token_file.as_ref().map(|p| p.display()),
        );
        argv.push_some(
            "--nats-tls-ca",
            self.nats_tls_ca.as_ref().map(|p| p.display()),
        );
        argv.push_some(
            "--nats-tls-cert",
            self.nats_tls_cert.as_ref().map(|p| p.display()),
        );
        argv.push_some(
            "--nats-tls-key",
            self.nats_tls_key.as_ref().map(|p| p.display()),
        );
        if self.nats_tls_required {
            argv.0.push("--nats-tls-required".into());
        }
    }

    /// Which credential applies: the creds file, else the NKey, else user and password, else a
    /// token (file, else `TANDEM_NATS_TOKEN`), else none.
    fn credential(
        &self,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Option<Credential>, NatsAuthError> {
        if let Some(path) = &self.nats_creds {
            return Ok(Some(Credential::Creds(path.clone())));
        }
        if let Some(path) = &self.nats_nkey_file {
            return Ok(Some(Credential::NKey(read_secret("NKey seed", path)?)));
        }
        if let Some(user) = &self.nats_user {
            let password = match &self.nats_password_file {
                Some(path) => read_secret("password", path)?,
                None => env(PASSWORD_VAR).ok_or(NatsAuthError::NoPassword)?,
            };
            return Ok(Some(Credential::UserPassword(user.clone(), password)));
        }
        if let Some(path) = &self.nats_token_file {
            return Ok(Some(Credential::Token(read_secret("token", path)?)));
        }
        Ok(env(TOKEN_VAR)
            .filter(|t| !t.is_empty())
            .map(Credential::Token))
    }

    /// Connection options carrying these credentials and TLS settings, named `name` on the
    /// server.
    pub async fn connect_options(
        &self,
        name: String,
    ) -> Result<async_nats::ConnectOptions, NatsAuthError> {
        // Two rustls crypto providers are compiled in (async-nats brings aws-lc-rs, the Hub
        // client ring); without one named, rustls panics at the first TLS connection.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let env = |name: &str| std::env::var(name).ok();
        let options = match self.credential(&env)? {
            None => async_nats::ConnectOptions::new(),
            Some(Credential::Creds(path)) => {
                async_nats::ConnectOptions::with_credentials_file(&path)
                    .await
                    .map_err(|e| NatsAuthError::Creds {
                        path: path.display().to_string(),
                        detail: e.to_string(),
                    })?
            }
            Some(Credential::NKey(seed)) => async_nats::ConnectOptions::with_nkey(seed),
            Some(Credential::UserPassword(user, password)) => {
                async_nats::ConnectOptions::with_user_and_password(user, password)
            }
            Some(Credential::Token(token)) => async_nats::ConnectOptions::with_token(token),
        };
        let mut options = options
            .name(name)
            .event_callback(|event| async move { log_bus_event(&event) });
        if let Some(ca) = &self.nats_tls_ca {
            options = options.add_root_certificates(ca.clone()).require_tls(true);
        }
        if let (Some(cert), Some(key)) = (&self.nats_tls_cert, &self.nats_tls_key) {
            options = options.add_client_certificate(cert.clone(), key.clone());
        }
        if self.nats_tls_required {
            options = options.require_tls(true);
        }
        Ok(options)
    }
}

/// Logs what the NATS connection reports: the server refusing something (a subject the
/// user's permissions do not allow, most often: then a publish is dropped or a subscription
/// gets nothing) and losing the connection are warnings an operator must see.
fn log_bus_event(event: &async_nats::Event) {
    use async_nats::{Event, ServerError};
    match event {
        Event::Connected => tracing::debug!("connected to NATS"),
        Event::ServerError(ServerError::Other(message)) if message.contains("Permissions") => {
            tracing::warn!(
                "the NATS server refused: {message} (this component's NATS user lacks a \
                 permission it needs: see docs/security.md and examples/nats/permissions.conf)"
            )
        }
        Event::Disconnected
        | Event::LameDuckMode
        | Event::SlowConsumer(_)
        | Event::ServerError(_)
        | Event::ClientError(_) => tracing::warn!("NATS: {event}"),
        Event::Draining | Event::Closed => tracing::info!("NATS: {event}"),
    }
}

/// A secret file's content, trimmed; an empty one is an error.
fn read_secret(what: &'static str, path: &Path) -> Result<String, NatsAuthError> {
    let text = std::fs::read_to_string(path).map_err(|source| NatsAuthError::Read {
        what,
        path: path.display().to_string(),
        source,
    })?;
    let secret = text.trim().to_string();
    if secret.is_empty() {
        return Err(NatsAuthError::Empty {
            what,
            path: path.display().to_string(),
        });
    }
    Ok(secret)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str, content: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("tandem-nats-auth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, content).unwrap();
        path
    }

    #[test]
    fn the_credential_is_chosen_in_nats_order_and_secrets_come_from_files_or_the_environment() {
        let no_env = |_: &str| None;
        let token_env = |name: &str| (name == TOKEN_VAR).then(|| "t0k".to_string());
        let password_env = |name: &str| (name == PASSWORD_VAR).then(|| "pw".to_string());
        assert!(
            NatsAuthArgs::default()
                .credential(&no_env)
                .unwrap()
                .is_none()
        );
        assert!(matches!(
            NatsAuthArgs::default().credential(&token_env).unwrap(),
            Some(Credential::Token(t)) if t == "t0k"
        ));
        let user = NatsAuthArgs {
            nats_user: Some("svc".into()),
            ..Default::default()
        };
        assert!(matches!(
            user.credential(&no_env),
            Err(NatsAuthError::NoPassword)
        ));
        assert!(matches!(
            user.credential(&password_env).unwrap(),
            Some(Credential::UserPassword(u, p)) if u == "svc" && p == "pw"
        ));
        let with_file = NatsAuthArgs {
            nats_password_file: Some(temp("pw", "from-file\n")),
            ..user.clone()
        };
        assert!(matches!(
            with_file.credential(&password_env).unwrap(),
            Some(Credential::UserPassword(_, p)) if p == "from-file"
        ));
        let empty = NatsAuthArgs {
            nats_token_file: Some(temp("empty", "\n")),
            ..Default::default()
        };
        assert!(matches!(
            empty.credential(&no_env),
            Err(NatsAuthError::Empty { .. })
        ));
        // No secret is ever rendered into a child's argv.
        let mut argv = Argv::default();
        with_file.push_args(&mut argv);
        let text: Vec<String> = argv
            .0
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert!(
            !text.iter().any(|a| a.contains("from-file") || a == "pw"),
            "{text:?}"
        );
        assert!(text.contains(&"--nats-user".to_string()), "{text:?}");
    }
}
