//! `berth agent`: the per-host API ([`crate::deploy::agent`]) started with its token and
//! TLS pair, or `--init-tls` making that pair. (berth's side of talking to agents is
//! [`crate::deploy::client`].)

use miette::miette;

use super::{CliError, GlobalOpts, Output};

/// Arguments of `berth agent`.
#[derive(Debug, clap::Args)]
pub struct AgentArgs {
    /// Address to listen on.
    #[arg(long, value_name = "ADDR", required_unless_present = "init_tls")]
    pub listen: Option<std::net::SocketAddr>,
    /// The agent's store: images, containers, releases.
    #[arg(long, value_name = "DIR", required_unless_present = "init_tls")]
    pub state: Option<std::path::PathBuf>,
    /// A file holding the bearer token clients must send.
    #[arg(long, value_name = "FILE", required_unless_present = "init_tls")]
    pub token_file: Option<std::path::PathBuf>,
    /// TLS certificate (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<std::path::PathBuf>,
    /// TLS key (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,
    /// Write a self-signed certificate and key (agent.crt, agent.key) into DIR, print the
    /// certificate's SHA-256 fingerprint, and exit.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["listen", "state", "token_file"])]
    pub init_tls: Option<std::path::PathBuf>,
    /// Names and addresses the certificate is for (with --init-tls) [default: localhost,
    /// 127.0.0.1 and this host's name].
    #[arg(long, value_name = "NAME")]
    pub san: Vec<String>,
}

/// Writes a self-signed pair for the agent; returns the certificate's fingerprint.
fn init_tls(dir: &std::path::Path, sans: &[String]) -> Result<String, CliError> {
    use sha2::Digest as _;
    let mut names = sans.to_vec();
    if names.is_empty() {
        names = vec!["localhost".into(), "127.0.0.1".into()];
        if let Ok(h) = nix::unistd::gethostname()
            && let Ok(h) = h.into_string()
        {
            names.push(h);
        }
    }
    let pair = rcgen::generate_simple_self_signed(names)
        .map_err(|e| CliError::failed(miette!("cannot make a certificate: {e}")))?;
    std::fs::create_dir_all(dir)
        .map_err(|e| CliError::failed(miette!("cannot create {}: {e}", dir.display())))?;
    let write = |name: &str, text: String, mode: u32| -> Result<(), CliError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let path = dir.join(name);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&path)
            .map_err(|e| CliError::failed(miette!("cannot write {}: {e}", path.display())))?;
        f.write_all(text.as_bytes())
            .map_err(|e| CliError::failed(miette!("cannot write {}: {e}", path.display())))
    };
    write("agent.key", pair.signing_key.serialize_pem(), 0o600)?;
    write("agent.crt", pair.cert.pem(), 0o644)?;
    let digest = sha2::Sha256::digest(pair.cert.der());
    Ok(digest
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":"))
}

/// `berth agent --listen ADDR --state DIR --token-file FILE [--tls-cert C --tls-key K]`, or
/// `berth agent --init-tls DIR`.
pub fn agent(_g: &GlobalOpts, args: &AgentArgs, out: &mut Output) -> Result<(), CliError> {
    if let Some(dir) = &args.init_tls {
        let fingerprint = init_tls(dir, &args.san)?;
        out.note(format!(
            "wrote {} and {}; start the agent with --tls-cert and --tls-key, and trust the\n\
             certificate on clients with BERTH_AGENT_CA={}",
            dir.join("agent.crt").display(),
            dir.join("agent.key").display(),
            dir.join("agent.crt").display()
        ))?;
        out.line(format!("SHA-256 fingerprint: {fingerprint}"))?;
        return Ok(());
    }
    let (Some(listen), Some(state), Some(token_file)) =
        (&args.listen, &args.state, &args.token_file)
    else {
        return Err(CliError::invalid(miette!(
            "--listen, --state and --token-file are required"
        )));
    };
    if let Ok(md) = std::fs::metadata(token_file) {
        use std::os::unix::fs::PermissionsExt;
        if md.permissions().mode() & 0o077 != 0 {
            crate::say!(
                "warning: {} is readable by other users (mode {:o}); chmod 600 it",
                token_file.display(),
                md.permissions().mode() & 0o777
            );
        }
    }
    let token = std::fs::read_to_string(token_file)
        .map_err(|e| CliError::failed(miette!("cannot read {}: {e}", token_file.display())))?
        .trim()
        .to_string();
    if token.len() < 16 {
        return Err(CliError::invalid(miette!(
            help = "head -c 32 /dev/urandom | base64 > token",
            "the token in {} is shorter than 16 characters",
            token_file.display()
        )));
    }
    let program = std::env::current_exe()
        .map_err(|e| CliError::failed(miette!("cannot find berth's own binary: {e}")))?;
    let cfg = crate::deploy::agent::AgentConfig {
        listen: *listen,
        state: state.clone(),
        token,
        tls: args.tls_cert.clone().zip(args.tls_key.clone()),
        program,
    };
    crate::deploy::agent::serve(cfg, &|addr| crate::say!("berth agent listening on {addr}"))
        .map_err(|e| CliError::failed(miette!("the agent stopped: {e}")))
}
