//! Turns `berth.toml` plus one environment file into an [`AppConfig`], reporting every
//! problem found on the way.
//!
//! Order: each file's top-level keys are checked against its own schema, the environment
//! file may only override services that `berth.toml` defines, then the two trees are merged
//! (see [`super::node::merge`]) and the merged tree is decoded once. Nodes remember their
//! file, so an error in a merged value points at whichever file set it.

use std::collections::BTreeMap;
use std::path::PathBuf;

use super::decode::{Decoder, suggest};
use super::node::{Node, Table, Value, merge};
use super::schema::*;
use super::secrets::SecretRef;
use super::values::{
    ByteSize, Cpus, Duration, ExposedPort, HostUrl, ImageRef, PortMapping, Protocol, RegistryRepo,
    RestartPolicy, Signal, VolumeMount, valid_dns_label, valid_env_name,
};

/// An environment file, parsed, with its name.
pub struct EnvInput<'a> {
    /// The environment's name.
    pub name: &'a str,
    /// The parsed file.
    pub node: &'a Node,
}

/// A diagnostic span limited to the first line of `node` (a whole table is too much to
/// underline when the complaint is that a key is missing from it).
fn head(node: &Node) -> Node {
    let text = node.file.text.as_str();
    let start = node.span.start.min(text.len());
    let end = text[start..]
        .find('\n')
        .map_or(text.len(), |i| start + i)
        .min(node.span.end.max(start));
    Node {
        file: node.file.clone(),
        span: start..end,
        value: Value::Bool(false),
    }
}

/// An optional key's decoded value: absent is fine (`Some(None)`), present and valid is
/// `Some(Some(v))`, present and invalid is `None`.
fn present<T>(v: Option<Option<T>>) -> Option<Option<T>> {
    match v {
        None => Some(None),
        Some(Some(v)) => Some(Some(v)),
        Some(None) => None,
    }
}

impl Decoder {
    fn missing(&mut self, node: &Node, path: &str, key: &str, help: &str) {
        let mut d = head(node).diag(
            "berth::missing-key",
            format!("missing `{key}` in `{path}`"),
            format!("`{key}` is required here"),
        );
        d.help = Some(help.to_string());
        self.diags.push(d);
    }
}

/// Resolves the configuration for `env`, or for `berth.toml` alone when `env` is `None`
/// (what `berth check` does for the shared file). Returns the config only when there
/// were no problems.
pub fn resolve(
    base: &Node,
    env: Option<EnvInput<'_>>,
    project_dir: &std::path::Path,
) -> (Option<AppConfig>, Decoder) {
    let mut d = Decoder::default();
    let Some(base_table) = d.table(base, "berth.toml") else {
        return (None, d);
    };
    d.known_keys(base_table, BASE_KEYS, "");
    let merged = match &env {
        Some(e) => {
            check_env_file(&mut d, base_table, e);
            merge(base, e.node)
        }
        None => base.clone(),
    };
    let config = decode_config(&mut d, base, &merged, env.as_ref().map(|e| e.name));
    let config = config.and_then(|mut c| {
        apply_env_layers(
            &mut d,
            &mut c,
            base,
            env.as_ref().map(|e| e.node),
            project_dir,
        )
        .then_some(c)
    });
    (config.filter(|_| d.diags.is_empty()), d)
}

/// `file:line` of a node, for messages about where something is declared.
fn origin(node: &Node) -> String {
    let (line, _) = node.file.line_col(node.span.start);
    format!("{}:{line}", node.file.name)
}

/// One level's variables: its `env_file`s (each read from the project, in order), then
/// its `env` table over them. The table was already checked when the merged tree was
/// decoded; the files are read and checked here.
fn layer(
    d: &mut Decoder,
    table: Option<&Node>,
    path: &str,
    project_dir: &std::path::Path,
) -> Option<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    let Some(t) = table.and_then(Node::as_table) else {
        return Some(out);
    };
    let mut ok = true;
    if let Some(files) = t.get("env_file") {
        let key = if path.is_empty() {
            "env_file".to_string()
        } else {
            format!("{path}.env_file")
        };
        let list = match &files.value {
            Value::String(_) => d.string(files, &key).map(|f| vec![(f, files)]),
            Value::Array(items) => items
                .iter()
                .map(|n| d.string(n, &key).map(|f| (f, n)))
                .collect::<Option<Vec<_>>>(),
            _ => {
                d.type_error(files, &key, "a path or a list of paths");
                None
            }
        };
        for (file, node) in list.into_iter().flatten() {
            let full = project_dir.join(&file);
            match std::fs::read_to_string(&full) {
                Ok(text) => match super::dotenv::parse(&text) {
                    Ok(vars) => out.extend(vars),
                    Err(e) => {
                        d.invalid(node, &key, format!("{file}: {e}"), None);
                        ok = false;
                    }
                },
                Err(e) => {
                    d.invalid(
                        node,
                        &key,
                        format!("cannot read the env file {file}: {e}"),
                        Some("env files are read from the project directory".into()),
                    );
                    ok = false;
                }
            }
        }
    }
    if let Some(env) = t.get("env") {
        // Checked once already (on the merged tree): errors here are not reported twice.
        let mut quiet = Decoder::default();
        out.extend(
            quiet
                .env_table(env, &format!("{path}.env"))
                .unwrap_or_default(),
        );
    }
    ok.then_some(out)
}

/// Sets every service's effective environment, in the documented precedence (later
/// wins): `berth.toml`'s top level, its `[services.S]`, the environment file's top level,
/// its `[services.S]` — each level's `env_file`s first, then its `env`.
fn apply_env_layers(
    d: &mut Decoder,
    config: &mut AppConfig,
    base: &Node,
    env: Option<&Node>,
    project_dir: &std::path::Path,
) -> bool {
    let svc = |root: Option<&Node>, name: &str| -> Option<Node> {
        root?
            .as_table()?
            .get("services")?
            .as_table()?
            .get(name)
            .cloned()
    };
    let base_top = layer(d, Some(base), "", project_dir);
    let env_top = layer(d, env, "", project_dir);
    let (Some(base_top), Some(env_top)) = (base_top, env_top) else {
        return false;
    };
    let mut ok = true;
    for (name, service) in config.services.iter_mut() {
        let path = format!("services.{name}");
        let (b, e) = (svc(Some(base), name), svc(env, name));
        let base_svc = layer(d, b.as_ref(), &path, project_dir);
        let env_svc = layer(d, e.as_ref(), &path, project_dir);
        let (Some(base_svc), Some(env_svc)) = (base_svc, env_svc) else {
            ok = false;
            continue;
        };
        let mut all = base_top.clone();
        all.extend(base_svc);
        all.extend(env_top.clone());
        all.extend(env_svc);
        service.env = all;
    }
    let mut top = base_top;
    top.extend(env_top);
    config.env = top;
    ok
}

/// Checks of an environment file on its own: its keys, and that it overrides only services
/// that `berth.toml` defines.
fn check_env_file(d: &mut Decoder, base: &Table, env: &EnvInput<'_>) {
    let Some(table) = d.table(env.node, env.name) else {
        return;
    };
    for key in table.keys() {
        let why = match key.name.as_str() {
            "app" => "the app's name is the same in every environment",
            "image" => {
                "every environment runs the same image: promotion moves one digest from environment to environment"
            }
            _ => continue,
        };
        let mut diag = key.diag(
            "berth::not-per-environment",
            format!("`{}` cannot be set in an environment file", key.name),
            "only allowed in berth.toml",
        );
        diag.help = Some(format!("move it to berth.toml; {why}"));
        d.diags.push(diag);
    }
    let env_keys: Vec<&str> = ENV_KEYS.iter().copied().chain(["app", "image"]).collect();
    d.known_keys(table, &env_keys, "");
    let base_services: Vec<&str> = base
        .get("services")
        .and_then(Node::as_table)
        .map(|t| t.keys().map(|k| k.name.as_str()).collect())
        .unwrap_or_default();
    if let Some(services) = table.get("services").and_then(Node::as_table) {
        for key in services.keys() {
            if !base_services.contains(&key.name.as_str()) {
                let mut diag = key.diag(
                    "berth::undefined-service",
                    format!("service `{}` is not defined in berth.toml", key.name),
                    "undefined service",
                );
                diag.help = Some(match suggest(&key.name, base_services.iter().copied()) {
                    Some(s) => format!("did you mean `{s}`?"),
                    None if base_services.is_empty() => "berth.toml defines no services".into(),
                    None => format!("berth.toml defines: {}", base_services.join(", ")),
                });
                d.diags.push(diag);
            }
        }
    }
}

fn decode_config(
    d: &mut Decoder,
    base: &Node,
    merged: &Node,
    env: Option<&str>,
) -> Option<AppConfig> {
    let root = d.table(merged, "berth.toml")?;
    let app = match root.get("app") {
        Some(n) => decode_app(d, n),
        None => {
            d.missing(base, "berth.toml", "[app]", "add:\n[app]\nname = \"hello\"");
            None
        }
    };
    let image = match root.get("image") {
        Some(n) => decode_image(d, n),
        None => {
            d.missing(
                base,
                "berth.toml",
                "[image]",
                "add:\n[image]\nfrom = \"scratch\"",
            );
            None
        }
    };
    let services = match root.get("services") {
        Some(n) => decode_services(d, n),
        None => Some(BTreeMap::new()),
    };
    let get = |k: &str| root.get(k);
    let env_vars = get("env").map_or(Some(BTreeMap::new()), |n| d.env_table(n, "env"));
    let secrets = get("secrets").map_or(Some(BTreeMap::new()), |n| decode_secrets(d, n));
    let rollout = get("rollout").map_or(Some(Rollout::default()), |n| decode_rollout(d, n));
    let agent = get("agent").map_or(Some(AgentAccess::default()), |n| decode_agent(d, n));
    let registry = get("registry").and_then(|n| d.parsed::<RegistryRepo>(n, "registry"));
    let hooks = get("hooks").map_or(Some(BTreeMap::new()), |n| decode_hooks(d, n));
    let hosts = match get("hosts") {
        Some(n) => decode_hosts(d, n),
        None => {
            if let Some(name) = env {
                let file = merged.file.clone();
                let mut diag = Node {
                    file,
                    span: 0..0,
                    value: Value::Bool(false),
                }
                .diag(
                    "berth::missing-key",
                    format!("environment `{name}` has no `hosts`"),
                    "no hosts",
                );
                diag.help =
                    Some("add `hosts = [\"local\"]` to run on this machine, or agent URLs".into());
                d.diags.push(diag);
            }
            Some((Vec::new(), BTreeMap::new()))
        }
    };
    let (hosts, pins) = match hosts {
        Some((h, p)) => (Some(h), p),
        None => (None, BTreeMap::new()),
    };
    let agent = agent.map(|mut a| {
        a.pins = pins;
        a
    });
    let promote_from = get("promote_from").and_then(|n| env_name(d, n, "promote_from"));
    let soak = get("soak").and_then(|n| d.parsed::<Duration>(n, "soak"));
    let require = get("require").map_or(Some(Vec::new()), |n| d.list(n, "require", env_name));

    if let (Some(env_vars), Some(secrets), Some(n)) =
        (&env_vars, &secrets, get("secrets").and_then(Node::as_table))
    {
        for (key, _) in &n.entries {
            if env_vars.contains_key(&key.name) && secrets.contains_key(&key.name) {
                let mut diag = key.diag(
                    "berth::secret-shadows-env",
                    format!("`{}` is both a secret and an `[env]` variable", key.name),
                    "also in [env]",
                );
                diag.help = Some(
                    "keep one: a secret is set in the container's environment under its name"
                        .into(),
                );
                d.diags.push(diag);
            }
        }
    }
    if let (Some(hosts), None, Some(_)) = (&hosts, &registry, env)
        && hosts.iter().any(|h| *h != HostUrl::Local)
        && let Some(n) = get("hosts")
    {
        let mut diag = n.diag(
            "berth::no-registry",
            "remote hosts need a registry to pull from",
            "agents cannot reach this machine's store",
        );
        diag.help = Some("set `registry = \"HOST/REPOSITORY\"` in this environment file".into());
        d.diags.push(diag);
    }

    Some(AppConfig {
        environment: env.unwrap_or_default().to_string(),
        app: app?,
        registry,
        hosts: hosts?,
        promote_from,
        soak,
        require: require?,
        env: env_vars?,
        secrets: secrets?,
        rollout: rollout?,
        agent: agent?,
        project_dir: PathBuf::new(),
        image: image?,
        services: services?,
        hooks: hooks?,
    })
}

/// `[hooks]`: each a command, as a string (run with `/bin/sh -c`) or an argv.
fn decode_hooks(d: &mut Decoder, node: &Node) -> Option<BTreeMap<String, CommandLine>> {
    let t = d.table(node, "hooks")?;
    d.known_keys(t, HOOK_KEYS, "hooks");
    let mut out = BTreeMap::new();
    let mut ok = true;
    for (key, value) in &t.entries {
        if !HOOK_KEYS.contains(&key.name.as_str()) {
            continue;
        }
        match d.command_line(value, &format!("hooks.{}", key.name)) {
            Some(c) => {
                out.insert(key.name.clone(), c);
            }
            None => ok = false,
        }
    }
    ok.then_some(out)
}

fn env_name(d: &mut Decoder, node: &Node, path: &str) -> Option<String> {
    let s = d.string(node, path)?;
    if valid_dns_label(&s) {
        Some(s)
    } else {
        d.invalid(
            node,
            path,
            format!("`{s}` is not an environment name"),
            None,
        );
        None
    }
}

fn decode_app(d: &mut Decoder, node: &Node) -> Option<App> {
    let t = d.table(node, "app")?;
    d.known_keys(t, APP_KEYS, "app");
    let Some(n) = t.get("name") else {
        d.missing(node, "app", "name", "e.g. name = \"hello\"");
        return None;
    };
    let name = d.string(n, "app.name")?;
    if !valid_dns_label(&name) {
        d.invalid(
            n,
            "app.name",
            format!("`{name}` is not a valid app name"),
            Some(
                "use lower-case letters, digits and `-`, starting with a letter (at most 63)"
                    .into(),
            ),
        );
        return None;
    }
    Some(App { name })
}

fn decode_image(d: &mut Decoder, node: &Node) -> Option<ImageSpec> {
    let t = d.table(node, "image")?;
    d.known_keys(t, IMAGE_KEYS, "image");
    // With a Dockerfile, its FROM lines decide: `from` is not needed.
    let from = match t.get("from") {
        Some(n) => d.parsed::<ImageRef>(n, "image.from").map(Some),
        None if t.get("dockerfile").is_some() => Some(None),
        None => {
            d.missing(
                node,
                "image",
                "from",
                "e.g. from = \"base:1\", or from = \"scratch\" for an empty base",
            );
            None
        }
    };
    let path = |d: &mut Decoder, k: &str| -> Option<Option<PathBuf>> {
        match t.get(k) {
            None => Some(None),
            Some(n) => {
                let s = d.string(n, &format!("image.{k}"))?;
                if s.is_empty() {
                    d.invalid(n, &format!("image.{k}"), "must not be empty", None);
                    return None;
                }
                Some(Some(PathBuf::from(s)))
            }
        }
    };
    let context = path(d, "context");
    let dockerfile = path(d, "dockerfile");
    let target = t.get("target").and_then(|n| d.string(n, "image.target"));
    let args = t
        .get("args")
        .map_or(Some(BTreeMap::new()), |n| d.env_table(n, "image.args"));
    let steps = t
        .get("steps")
        .map_or(Some(Vec::new()), |n| d.steps(n, "image.steps"));
    if let (Some(_), Some(steps_node)) = (t.get("dockerfile"), t.get("steps")) {
        let mut diag = steps_node.diag(
            "berth::conflicting-keys",
            "`image.steps` and `image.dockerfile` cannot both be set",
            "steps here",
        );
        diag.help = Some("build from the Dockerfile or from steps, not both".into());
        d.diags.push(diag);
    }
    let secrets = match t.get("secrets") {
        None => Some(BTreeMap::new()),
        Some(n) => d.table(n, "image.secrets").and_then(|st| {
            let mut out = BTreeMap::new();
            let mut ok = true;
            for (key, value) in &st.entries {
                let path = format!("image.secrets.{}", key.name);
                let var = key.name.to_ascii_uppercase().replace(['-', '.'], "_");
                match decode_secret_ref(d, value, &path, &key.name, &var) {
                    Some(r) => {
                        out.insert(key.name.clone(), r);
                    }
                    None => ok = false,
                }
            }
            ok.then_some(out)
        }),
    };
    let compression = match t.get("compression") {
        None => Some(Compression::Gzip),
        Some(n) => match d.string(n, "image.compression")?.as_str() {
            "gzip" => Some(Compression::Gzip),
            "zstd" => Some(Compression::Zstd),
            other => {
                d.invalid(
                    n,
                    "image.compression",
                    format!("`{other}` is not gzip or zstd"),
                    None,
                );
                None
            }
        },
    };
    let compression_level = match (t.get("compression_level"), compression) {
        (None, _) => Some(None),
        (Some(n), Some(Compression::Zstd)) => d
            .int_in(n, "image.compression_level", 1..=19)
            .map(|v| Some(v as i32)),
        (Some(n), _) => d
            .int_in(n, "image.compression_level", 0..=9)
            .map(|v| Some(v as i32)),
    };
    Some(ImageSpec {
        from: from?,
        context: context?.unwrap_or_else(|| PathBuf::from(".")),
        dockerfile: dockerfile?,
        target,
        args: args?,
        steps: steps?,
        compression: compression?,
        compression_level: compression_level?,
        secrets: secrets?,
    })
}

fn decode_secrets(d: &mut Decoder, node: &Node) -> Option<BTreeMap<String, SecretSpec>> {
    let t = d.table(node, "secrets")?;
    let mut out = BTreeMap::new();
    let mut ok = true;
    for (key, value) in &t.entries {
        let path = format!("secrets.{}", key.name);
        if !valid_env_name(&key.name) {
            d.diags.push(key.diag(
                "berth::invalid-value",
                format!("`{}` is not a valid variable name", key.name),
                "invalid name",
            ));
            ok = false;
            continue;
        }
        // `as = "env" | "file"`: how it reaches containers.
        let mut delivery = Delivery::Env;
        if let Some(a) = value.as_table().and_then(|t| t.get("as")) {
            match d.string(a, &format!("{path}.as")).as_deref() {
                Some("env") => delivery = Delivery::Env,
                Some("file") => delivery = Delivery::File,
                Some(other) => {
                    d.invalid(
                        a,
                        &format!("{path}.as"),
                        format!("`{other}` is neither `env` nor `file`"),
                        Some("as = \"env\" (a variable, the default) or as = \"file\" (/run/secrets/NAME)".into()),
                    );
                    ok = false;
                }
                None => ok = false,
            }
        }
        let source = decode_secret_ref(d, value, &path, &key.name, &key.name);
        match source {
            Some(source) => {
                out.insert(
                    key.name.clone(),
                    SecretSpec {
                        source,
                        delivery,
                        origin: origin(value),
                    },
                );
            }
            None => ok = false,
        }
    }
    ok.then_some(out)
}

/// `{ env = "VAR" }` or `{ file = "PATH" }`: where a secret's value is read from. A
/// literal string is refused (secret values never go in configuration files).
fn decode_secret_ref(
    d: &mut Decoder,
    value: &Node,
    path: &str,
    name: &str,
    var: &str,
) -> Option<SecretRef> {
    match &value.value {
        Value::Table(st) => {
            let allowed: &[&str] = if path.starts_with("secrets.") {
                SECRET_KEYS
            } else {
                &["env", "file"]
            };
            d.known_keys(st, allowed, path);
            match (st.get("env"), st.get("file")) {
                (Some(e), None) => d.string(e, &format!("{path}.env")).map(SecretRef::Env),
                (None, Some(f)) => d
                    .string(f, &format!("{path}.file"))
                    .map(|f| SecretRef::File(f.into())),
                _ => {
                    d.invalid(value, path, "needs exactly one of `env` or `file`", None);
                    None
                }
            }
        }
        Value::String(_) => {
            let mut diag = value.diag(
                "berth::literal-secret",
                format!("secret `{name}` is written as a literal value"),
                "secret values never go in configuration files",
            );
            diag.help = Some(format!(
                "read it from the environment or a file: {name} = {{ env = \"{var}\" }}"
            ));
            d.diags.push(diag);
            None
        }
        _ => {
            d.type_error(
                value,
                path,
                "a table ({ env = \"VAR\" } or { file = \"PATH\" })",
            );
            None
        }
    }
}

fn decode_agent(d: &mut Decoder, node: &Node) -> Option<AgentAccess> {
    let t = d.table(node, "agent")?;
    d.known_keys(t, AGENT_KEYS, "agent");
    let mut a = AgentAccess::default();
    let mut ok = true;
    if let Some(n) = t.get("token") {
        a.token = decode_secret_ref(d, n, "agent.token", "token", "BERTH_AGENT_TOKEN");
        ok &= a.token.is_some();
    }
    if let Some(n) = t.get("fingerprint") {
        a.fingerprint = d.parsed::<super::values::Fingerprint>(n, "agent.fingerprint");
        ok &= a.fingerprint.is_some();
    }
    if let Some(n) = t.get("ca") {
        // `ca = { file = "ca.pem" }`, or the path as a string.
        let path = match &n.value {
            Value::Table(ct) => {
                d.known_keys(ct, &["file"], "agent.ca");
                match ct.get("file") {
                    Some(f) => d.string(f, "agent.ca.file"),
                    None => {
                        d.invalid(
                            n,
                            "agent.ca",
                            "needs `file`",
                            Some("ca = { file = \"agents-ca.pem\" }".into()),
                        );
                        None
                    }
                }
            }
            _ => d.string(n, "agent.ca"),
        };
        a.ca = path.map(PathBuf::from);
        ok &= a.ca.is_some();
    }
    if let Some(n) = t.get("insecure") {
        match d.bool(n, "agent.insecure") {
            Some(b) => a.insecure = b,
            None => ok = false,
        }
    }
    ok.then_some(a)
}

fn decode_rollout(d: &mut Decoder, node: &Node) -> Option<Rollout> {
    let t = d.table(node, "rollout")?;
    d.known_keys(t, ROLLOUT_KEYS, "rollout");
    let mut r = Rollout::default();
    let mut ok = true;
    let mut int = |d: &mut Decoder, k: &str, lo: i64, slot: &mut u32| {
        if let Some(n) = t.get(k) {
            match d.int_in(n, &format!("rollout.{k}"), lo..=10_000) {
                Some(v) => *slot = v as u32,
                None => ok = false,
            }
        }
    };
    int(d, "batch", 1, &mut r.batch);
    int(d, "max_failures", 0, &mut r.max_failures);
    int(d, "keep", 0, &mut r.keep);
    for (k, slot) in [("drain", &mut r.drain), ("timeout", &mut r.timeout)] {
        if let Some(n) = t.get(k) {
            match d.parsed::<Duration>(n, &format!("rollout.{k}")) {
                Some(v) => *slot = v,
                None => ok = false,
            }
        }
    }
    ok.then_some(r)
}

/// `hosts`: each a URL (or `local`), or a table `{ url = "…", fingerprint = "…" }` pinning
/// that host's certificate. Returns the hosts and the pins by URL.
fn decode_hosts(
    d: &mut Decoder,
    node: &Node,
) -> Option<(Vec<HostUrl>, BTreeMap<String, super::values::Fingerprint>)> {
    let mut pins = BTreeMap::new();
    let hosts = d.list(node, "hosts", |d, n, p| match &n.value {
        Value::Table(t) => {
            d.known_keys(t, HOST_KEYS, p);
            let Some(url) = t.get("url") else {
                d.invalid(
                    n,
                    p,
                    "a host table needs `url`",
                    Some(
                        "{ url = \"https://198.18.0.12:7443\", fingerprint = \"AB:CD:…\" }".into(),
                    ),
                );
                return None;
            };
            let host = d.parsed::<HostUrl>(url, &format!("{p}.url"))?;
            if let Some(f) = t.get("fingerprint") {
                let fp = d.parsed::<super::values::Fingerprint>(f, &format!("{p}.fingerprint"))?;
                if matches!(host, HostUrl::Local) {
                    d.invalid(
                        f,
                        &format!("{p}.fingerprint"),
                        "`local` has no certificate to pin",
                        None,
                    );
                    return None;
                }
                pins.insert(host.to_string(), fp);
            }
            Some(host)
        }
        _ => d.parsed::<HostUrl>(n, p),
    })?;
    if hosts.is_empty() {
        d.invalid(
            node,
            "hosts",
            "an environment needs at least one host",
            Some("e.g. hosts = [\"local\"]".into()),
        );
        return None;
    }
    let elems = match &node.value {
        Value::Array(a) => a,
        _ => unreachable!("list() accepted it"),
    };
    for (i, h) in hosts.iter().enumerate() {
        if hosts[..i].contains(h) {
            d.invalid(&elems[i], "hosts", format!("`{h}` is listed twice"), None);
            return None;
        }
    }
    Some((hosts, pins))
}

/// A published port with where it was written, for the duplicate check.
struct Published<'n> {
    port: PortMapping,
    node: &'n Node,
    service: String,
}

fn decode_services(d: &mut Decoder, node: &Node) -> Option<BTreeMap<String, Service>> {
    let t = d.table(node, "services")?;
    let mut out = BTreeMap::new();
    let mut published: Vec<Published<'_>> = Vec::new();
    let mut ok = true;
    for (key, value) in &t.entries {
        if !valid_dns_label(&key.name) {
            let mut diag = key.diag(
                "berth::invalid-value",
                format!("`{}` is not a valid service name", key.name),
                "invalid name",
            );
            diag.help =
                Some("services are reached by name: lower-case letters, digits and `-`".into());
            d.diags.push(diag);
            ok = false;
            continue;
        }
        match decode_service(d, value, &key.name, &mut published) {
            Some(s) => {
                out.insert(key.name.clone(), s);
            }
            None => ok = false,
        }
    }
    for (i, p) in published.iter().enumerate() {
        let clash = published[..i].iter().find(|q| {
            q.port.published == p.port.published
                && q.port.protocol == p.port.protocol
                && (q.port.host_ip.is_none()
                    || p.port.host_ip.is_none()
                    || q.port.host_ip == p.port.host_ip)
        });
        if let Some(q) = clash {
            let mut diag = p.node.diag(
                "berth::duplicate-port",
                format!("host port {} is published twice", p.port.published),
                format!("also published by service `{}`", q.service),
            );
            diag.help =
                Some("each published port belongs to one service; pick another host port".into());
            d.diags.push(diag);
            ok = false;
        }
    }
    ok.then_some(out)
}

fn decode_service<'n>(
    d: &mut Decoder,
    node: &'n Node,
    name: &str,
    published: &mut Vec<Published<'n>>,
) -> Option<Service> {
    let path = format!("services.{name}");
    let t = d.table(node, &path)?;
    d.known_keys(t, SERVICE_KEYS, &path);
    let p = |k: &str| format!("{path}.{k}");
    let command = t.get("command").map(|n| d.command_line(n, &p("command")));
    let entrypoint = t
        .get("entrypoint")
        .map(|n| d.command_line(n, &p("entrypoint")));
    let ports = match t.get("ports") {
        None => Some(Vec::new()),
        Some(n) => {
            let ports = d.list(n, &p("ports"), |d, n, p| {
                d.parsed_or_int::<PortMapping>(n, p)
            });
            if let (Some(ports), Value::Array(elems)) = (&ports, &n.value) {
                for (port, elem) in ports.iter().zip(elems) {
                    published.push(Published {
                        port: *port,
                        node: elem,
                        service: name.to_string(),
                    });
                }
            }
            ports
        }
    };
    let expose = t.get("expose").map_or(Some(Vec::new()), |n| {
        d.list(n, &p("expose"), |d, n, p| {
            d.parsed_or_int::<ExposedPort>(n, p)
        })
    });
    let volumes = t.get("volumes").map_or(Some(Vec::new()), |n| {
        d.list(n, &p("volumes"), |d, n, p| d.parsed::<VolumeMount>(n, p))
    });
    let env = t
        .get("env")
        .map_or(Some(BTreeMap::new()), |n| d.env_table(n, &p("env")));
    let replicas = t.get("replicas").map_or(Some(1), |n| {
        d.int_in(n, &p("replicas"), 0..=1000).map(|v| v as u32)
    });
    let resources = t.get("resources").map_or(Some(Resources::default()), |n| {
        decode_resources(d, n, &p("resources"))
    });
    let restart = t.get("restart").map_or(Some(RestartPolicy::Always), |n| {
        d.parsed::<RestartPolicy>(n, &p("restart"))
    });
    let stop_signal = t
        .get("stop_signal")
        .map(|n| d.parsed_or_int::<Signal>(n, &p("stop_signal")));
    let stop_timeout = t
        .get("stop_timeout")
        .map_or(Some(Service::DEFAULT_STOP_TIMEOUT), |n| {
            d.parsed::<Duration>(n, &p("stop_timeout"))
        });
    let health = t.get("health").map(|n| decode_health(d, n, &p("health")));

    // A health check must probe a port the service listens on.
    if let (Some(Some(h)), Some(ports), Some(expose), Some(hn)) =
        (&health, &ports, &expose, t.get("health"))
    {
        let port = match h.probe {
            Probe::Http { port, .. } | Probe::Tcp { port } => Some(port),
            Probe::Exec { .. } => None,
        };
        let listens = |port: u16| {
            ports
                .iter()
                .any(|p| p.container == port && p.protocol == Protocol::Tcp)
                || expose
                    .iter()
                    .any(|e| e.port == port && e.protocol == Protocol::Tcp)
        };
        if let Some(port) = port
            && !listens(port)
        {
            let target = hn
                .as_table()
                .and_then(|ht| ht.get("port").or_else(|| ht.get("tcp")))
                .unwrap_or(hn);
            let mut diag = target.diag(
                "berth::health-port-not-exposed",
                format!("service `{name}` health-checks port {port}, which it does not expose"),
                format!("port {port} is not among the service's ports"),
            );
            diag.help = Some(format!(
                "publish it (`ports = [\"{port}:{port}\"]`) or list it in `expose = [{port}]`"
            ));
            d.diags.push(diag);
        }
    }

    Some(Service {
        command: present(command)?,
        entrypoint: present(entrypoint)?,
        ports: ports?,
        expose: expose?,
        health: present(health)?,
        volumes: volumes?,
        env: env?,
        replicas: replicas?,
        resources: resources?,
        restart: restart?,
        stop_signal: present(stop_signal)?,
        stop_timeout: stop_timeout?,
    })
}

fn decode_resources(d: &mut Decoder, node: &Node, path: &str) -> Option<Resources> {
    let t = d.table(node, path)?;
    d.known_keys(t, RESOURCE_KEYS, path);
    let memory = t
        .get("memory")
        .map(|n| d.parsed_or_int::<ByteSize>(n, &format!("{path}.memory")));
    let cpus = t.get("cpus").map(|n| match &n.value {
        Value::Integer(i) => d.parse_str::<Cpus>(n, &format!("{path}.cpus"), &i.to_string()),
        Value::Float(f) => match Cpus::from_f64(*f) {
            Ok(c) => Some(c),
            Err(why) => {
                d.invalid(n, &format!("{path}.cpus"), why, None);
                None
            }
        },
        _ => d.parsed::<Cpus>(n, &format!("{path}.cpus")),
    });
    let pids = t.get("pids").map(|n| {
        d.int_in(n, &format!("{path}.pids"), 1..=4_194_304)
            .map(|v| v as u32)
    });
    if let Some(Some(m)) = memory
        && m.0 < 6 << 20
        && let Some(n) = t.get("memory")
    {
        d.invalid(
            n,
            &format!("{path}.memory"),
            format!("{m} is below the 6M minimum a container needs"),
            None,
        );
        return None;
    }
    Some(Resources {
        memory: present(memory)?,
        cpus: present(cpus)?,
        pids: present(pids)?,
    })
}

fn decode_health(d: &mut Decoder, node: &Node, path: &str) -> Option<HealthCheck> {
    let t = d.table(node, path)?;
    d.known_keys(t, HEALTH_KEYS, path);
    let p = |k: &str| format!("{path}.{k}");
    let probes: Vec<&str> = ["http", "tcp", "exec"]
        .into_iter()
        .filter(|k| t.get(k).is_some())
        .collect();
    let probe = match probes.as_slice() {
        ["http"] => {
            let url_path = d.string(t.get("http").expect("present"), &p("http"));
            let url_path = url_path.filter(|s| {
                let ok = s.starts_with('/');
                if !ok {
                    d.invalid(
                        t.get("http").expect("present"),
                        &p("http"),
                        "the path must start with `/`",
                        None,
                    );
                }
                ok
            });
            let port = match t.get("port") {
                Some(n) => d
                    .parsed_or_int::<PortMapping>(n, &p("port"))
                    .map(|pm| pm.container),
                None => {
                    d.missing(
                        node,
                        path,
                        "port",
                        "an http check needs the container port, e.g. port = 8080",
                    );
                    None
                }
            };
            Some(Probe::Http {
                path: url_path?,
                port: port?,
            })
        }
        ["tcp"] => {
            if let Some(n) = t.get("port") {
                d.invalid(
                    n,
                    &p("port"),
                    "a tcp check names its port as `tcp = PORT`",
                    None,
                );
            }
            d.parsed_or_int::<PortMapping>(t.get("tcp").expect("present"), &p("tcp"))
                .map(|pm| Probe::Tcp { port: pm.container })
        }
        ["exec"] => d
            .command_line(t.get("exec").expect("present"), &p("exec"))
            .map(|command| Probe::Exec { command }),
        [] => {
            d.missing(
                node,
                path,
                "http`, `tcp` or `exec",
                "e.g. health = { http = \"/\", port = 8080 }",
            );
            None
        }
        _ => {
            d.invalid(node, path, "give one probe: `http`, `tcp` or `exec`", None);
            None
        }
    };
    let dur = |d: &mut Decoder, k: &str, default: Duration| match t.get(k) {
        Some(n) => d.parsed::<Duration>(n, &p(k)),
        None => Some(default),
    };
    let interval = dur(d, "interval", HealthCheck::DEFAULT_INTERVAL);
    let timeout = dur(d, "timeout", HealthCheck::DEFAULT_TIMEOUT);
    let start_period = dur(d, "start_period", Duration::default());
    let retries = t
        .get("retries")
        .map_or(Some(HealthCheck::DEFAULT_RETRIES), |n| {
            d.int_in(n, &p("retries"), 1..=1000).map(|v| v as u32)
        });
    for (k, v) in [("interval", interval), ("timeout", timeout)] {
        if v == Some(Duration::default())
            && let Some(n) = t.get(k)
        {
            d.invalid(n, &p(k), format!("`{k}` must be longer than zero"), None);
            return None;
        }
    }
    Some(HealthCheck {
        probe: probe?,
        interval: interval?,
        timeout: timeout?,
        retries: retries?,
        start_period: start_period?,
    })
}
