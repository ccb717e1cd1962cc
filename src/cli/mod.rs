//! The command line: clap structs, one small handler per command, and the one place that
//! turns errors into reports and exit codes (0 ok, 1 failed operation, 2 bad input).

mod agents;
mod build;
mod check;
mod completions;
mod config;
mod containers;
mod deploy;
mod diff;
mod error;
mod images;
mod init;
mod network;
mod output;
mod pipeline;
mod progress;
mod promote;
mod registry;
mod run;
mod status;
mod table;
mod tty;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

pub use error::{CliError, ExitKind};
pub use output::Output;

/// Build, ship and promote an app from source to production.
#[derive(Debug, Parser)]
#[command(
    name = "berth",
    version,
    about,
    propagate_version = true,
    max_term_width = 100
)]
pub struct Cli {
    /// Options every command takes.
    #[command(flatten)]
    pub global: GlobalOpts,
    /// The command to run.
    #[command(subcommand)]
    pub command: Command,
}

/// Options every command takes.
#[derive(Debug, clap::Args)]
pub struct GlobalOpts {
    /// Run as if started in DIR (the project directory).
    #[arg(short = 'C', value_name = "DIR", global = true)]
    pub project_dir: Option<PathBuf>,
    /// Where images, layers and containers live [default: $BERTH_STORE, else
    /// /var/lib/berth as root, else $XDG_DATA_HOME/berth].
    // BERTH_STORE is read in `store_dir`, not through clap's `env`: clap would print
    // `--store <DIR>` in every usage line as if it were required.
    #[arg(long, value_name = "DIR", global = true)]
    pub store: Option<PathBuf>,
    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    /// Print only results and errors.
    #[arg(short, long, global = true)]
    pub quiet: bool,
    /// Print more about what is happening (repeat for more). Goes before the command
    /// (`berth -v build`): after `run`, `-v` mounts a volume, as in Docker.
    #[arg(short, long, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

impl GlobalOpts {
    /// The project directory: `-C DIR`, else the current directory.
    pub fn project_dir(&self) -> PathBuf {
        self.project_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from("."))
    }

    /// The store directory: `--store`/`BERTH_STORE`, else `/var/lib/berth` for root, else
    /// `$XDG_DATA_HOME/berth` (`~/.local/share/berth`).
    pub fn store_dir(&self) -> PathBuf {
        if let Some(dir) = &self.store {
            return dir.clone();
        }
        if let Some(dir) = std::env::var_os("BERTH_STORE").filter(|v| !v.is_empty()) {
            return PathBuf::from(dir);
        }
        // Root in berth's rootless user namespace is still the user: their store.
        if nix::unistd::geteuid().is_root() && !crate::runtime::rootless::active() {
            return PathBuf::from("/var/lib/berth");
        }
        let data = std::env::var_os("XDG_DATA_HOME")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
            .unwrap_or_else(|| PathBuf::from("."));
        data.join("berth")
    }
}

/// berth's commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create berth.toml, environments/{dev,uat,prod}.toml and .berthignore.
    Init(init::InitArgs),
    /// Validate berth.toml and the environment files.
    Check(check::CheckArgs),
    /// Build the app's image from [image] steps or its Dockerfile.
    Build(build::BuildArgs),
    /// List images in the store.
    Images(images::ImagesArgs),
    /// Show an image's layers and the steps that made them.
    History(images::ImageArg),
    /// Print a container's or an image's details as JSON.
    Inspect(images::ImageArg),
    /// Give an image another name.
    Tag(images::TagArgs),
    /// Remove images (their tags, and blobs nothing else uses).
    Rmi(images::RmiArgs),
    /// Remove every blob and unpacked layer no tag, container or kept release needs.
    Gc(images::GcArgs),
    /// Make a one-layer base image from a root filesystem directory or tar.
    Import(images::ImportArgs),
    /// Write an image as an OCI or Docker archive.
    Export(images::ExportArgs),
    /// Write an image as an OCI runtime bundle (config.json + rootfs) for runc.
    Bundle(images::BundleArgs),
    /// Run a command in a new container: attached (exits with its code) or detached (-d).
    Run(Box<run::RunArgs>),
    /// List running containers (all with -a).
    Ps(containers::PsArgs),
    /// Print a container's output (-f to follow it).
    Logs(containers::LogsArgs),
    /// Start stopped containers again, detached.
    Start(containers::StartArgs),
    /// Stop containers: their stop signal, then SIGKILL after a grace time.
    Stop(containers::StopArgs),
    /// Send a signal to containers.
    Kill(containers::KillArgs),
    /// Run a command in a running container.
    Exec(containers::ExecArgs),
    /// Remove containers.
    Rm(containers::RmArgs),
    /// Push an image to a registry (only the blobs it lacks).
    Push(registry::PushArgs),
    /// Pull an image from a registry into the store.
    Pull(registry::PullArgs),
    /// Copy an image between repositories or registries, digest-preserving.
    Copy(registry::CopyArgs),
    /// Save credentials for a registry (in Docker's config.json).
    Login(registry::LoginArgs),
    /// Forget a registry's credentials.
    Logout(registry::LogoutArgs),
    /// Build, then roll the app out to an environment's hosts with health checks and no
    /// downtime.
    Deploy(deploy::DeployArgs),
    /// What every host of an environment runs, compared with its ledger.
    Status(status::StatusArgs),
    /// Stop and remove everything an environment runs.
    Down(deploy::EnvArgs),
    /// Roll an environment back to an earlier release.
    Rollback(deploy::RollbackArgs),
    /// An environment's releases, newest first.
    Releases(status::ReleasesArgs),
    /// Move the image an environment runs into the next one: gates, digest-exact copy,
    /// rollout.
    Promote(promote::PromoteArgs),
    /// What differs between two releases: config, layers, files, commits, environment.
    Diff(diff::DiffArgs),
    /// Change the number of replicas of services (SERVICE=N).
    Scale(deploy::ScaleArgs),
    /// Run the agent that applies releases to this host over an HTTP API.
    Agent(agents::AgentArgs),
    /// A service's router (internal).
    #[command(name = "__router", hide = true)]
    Router {
        /// Its state directory.
        dir: std::path::PathBuf,
        /// Descriptor to report the start on.
        ready: i32,
    },
    /// Manage bridge networks.
    #[command(subcommand)]
    Network(network::NetworkCommand),
    /// Manage named volumes.
    #[command(subcommand)]
    Volume(network::VolumeCommand),
    /// A detached container's supervisor (internal).
    #[command(name = "__supervise", hide = true)]
    Supervise {
        /// The container's id.
        id: String,
        /// Descriptor to report the start on.
        ready: i32,
    },
    /// The container's init (internal).
    #[command(name = "__init", hide = true)]
    ContainerInit {
        /// The command's pid.
        pid: i32,
        /// Descriptor to signal readiness on.
        ready: i32,
        /// Descriptor to write the exit code to.
        status: Option<i32>,
    },
    /// Print an environment's fully resolved configuration, or diff two.
    Config(config::ConfigArgs),
    /// Print a shell completion script.
    Completions(completions::CompletionsArgs),
    /// Print berth's man page, or write one per command into a directory.
    Man(completions::ManArgs),
}

/// The command line, parsed. The agent's help leaves out the options it does not take
/// (it has `--state`, prints no JSON and reads no project).
fn parse() -> Result<Cli, clap::Error> {
    use clap::{Arg, ArgAction, CommandFactory, FromArgMatches, value_parser};
    // Hidden arguments of its own under the global ones' names: clap then does not show
    // the global ones there (they are accepted, and unused).
    let cmd = Cli::command().mut_subcommand("agent", |a| {
        a.arg(
            Arg::new("project_dir")
                .short('C')
                .value_name("DIR")
                .value_parser(value_parser!(PathBuf))
                .hide(true),
        )
        .arg(
            Arg::new("store")
                .long("store")
                .value_name("DIR")
                .value_parser(value_parser!(PathBuf))
                .hide(true),
        )
        .arg(
            Arg::new("json")
                .long("json")
                .action(ArgAction::SetTrue)
                .hide(true),
        )
    });
    Cli::from_arg_matches(&cmd.try_get_matches()?)
}

/// Parses the command line, runs the command and returns the process exit code.
pub fn main() -> ExitCode {
    // Nothing berth writes is ever group- or world-writable, whatever the caller's umask
    // (state that root acts on later must not be replaceable by another user).
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
    nix::sys::stat::umask(old | nix::sys::stat::Mode::from_bits_truncate(0o022));
    let cli = match parse() {
        Ok(cli) => cli,
        Err(e) => {
            // clap prints help and version to stdout (exit 0) and usage errors to stderr.
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    // Without root, everything that touches the store runs in berth's user namespace
    // (see `runtime::rootless`). Before any thread starts: setns needs one thread.
    if !matches!(
        cli.command,
        Command::Completions(_)
            | Command::Man(_)
            | Command::ContainerInit { .. }
            | Command::Init(_)
            | Command::Check(_)
            | Command::Config(_)
            | Command::Login(_)
            | Command::Logout(_)
    ) && let Err(e) = crate::runtime::rootless::enter(&cli.global.store_dir())
    {
        crate::say!(
            "berth: warning: cannot enter a user namespace ({e}); going on without one: containers and RUN steps need root or a user namespace"
        );
    }
    error::install_report_handler();
    // Every retry of a registry request is a line on stderr (what failed, the attempt,
    // the wait), unless -q.
    if !cli.global.quiet {
        crate::registry_client::retry::observe(std::sync::Arc::new(|r| crate::say!("berth: {r}")));
    }
    let mut out = Output::new(cli.global.json, cli.global.quiet);
    let result = run(&cli, &mut out);
    // With --json, stdout holds exactly one document: a command that wrote none (it
    // only had lines to say, or it failed) gets one saying so.
    let error = result
        .as_ref()
        .err()
        .filter(|e| e.kind != ExitKind::Success);
    let _ = out.finish(
        error
            .map(|e| (e.message(), e.code()))
            .as_ref()
            .map(|(m, c)| (m.as_str(), *c)),
    );
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => e.report(),
    }
}

/// Where `BERTH_REGISTRY_USER`/`_PASSWORD` may go in this command: the registries the
/// project's environments name, and those the command line names.
fn scope_registry_credentials(cli: &Cli) {
    use crate::registry_client::Reference;
    let mut hosts = Vec::new();
    if let Ok(project) = crate::manifest::Project::load(&cli.global.project_dir()) {
        for env in project.environments() {
            if let Ok(c) = project.resolve(&env)
                && let Some(r) = c.registry
            {
                hosts.push(r.host.clone());
            }
        }
    }
    let named: Vec<&str> = match &cli.command {
        Command::Push(a) => vec![a.destination.as_str()],
        Command::Pull(a) => vec![a.reference.as_str()],
        Command::Copy(a) => vec![a.source.as_str(), a.destination.as_str()],
        Command::Login(a) => {
            hosts.push(
                a.registry
                    .trim_start_matches("https://")
                    .trim_start_matches("http://")
                    .to_string(),
            );
            vec![]
        }
        _ => vec![],
    };
    hosts.extend(
        named
            .into_iter()
            .filter_map(|r| r.parse::<Reference>().ok())
            .map(|r| r.registry),
    );
    crate::registry_client::auth::scope_env_credentials(hosts);
}

/// Before a command that looks at or acts on containers: containers whose supervisor died
/// get a new one (adopted as they run, or started again under their restart policy), so
/// what the command sees and does is supervised again.
fn adopt_lost_supervisors(cli: &Cli) {
    use Command as C;
    let wanted = matches!(
        cli.command,
        C::Run(_)
            | C::Ps(_)
            | C::Logs(_)
            | C::Start(_)
            | C::Stop(_)
            | C::Kill(_)
            | C::Exec(_)
            | C::Rm(_)
            | C::Inspect(_)
            | C::Rmi(_)
            | C::Gc(_)
            | C::Deploy(_)
            | C::Status(_)
            | C::Down(_)
            | C::Rollback(_)
            | C::Scale(_)
    );
    let dir = cli.global.store_dir();
    if !wanted || !dir.join("berth/containers").is_dir() {
        return;
    }
    if let (Ok(store), Ok(exe)) = (crate::store::Store::open(&dir), std::env::current_exe()) {
        crate::runtime::supervisor::adopt_lost(&store, &exe);
    }
}

/// Runs one parsed command.
pub fn run(cli: &Cli, out: &mut Output) -> Result<(), CliError> {
    let g = &cli.global;
    scope_registry_credentials(cli);
    adopt_lost_supervisors(cli);
    match &cli.command {
        Command::Init(args) => init::run(g, args, out),
        Command::Check(args) => check::run(g, args, out),
        Command::Build(args) => build::run(g, args, out),
        Command::Images(a) => images::images(g, a, out),
        Command::History(args) => images::history(g, args, out),
        Command::Inspect(args) => match containers::inspect_container(g, &args.image)? {
            Some(v) => Ok(out.json_value(&v)?),
            None => images::inspect(g, args, out),
        },
        Command::Tag(args) => images::tag(g, args, out),
        Command::Rmi(args) => images::rmi(g, args, out),
        Command::Gc(args) => images::gc(g, args, out),
        Command::Import(args) => images::import(g, args, out),
        Command::Export(args) => images::export(g, args, out),
        Command::Bundle(args) => images::bundle(g, args, out),
        Command::Run(args) => run::run(g, args, out),
        Command::Ps(args) => match &args.env {
            Some(env) => status::env_ps(g, env, args.host.as_deref(), out),
            None => containers::ps(g, args, out),
        },
        Command::Logs(args) => match &args.env {
            Some(env) => status::env_logs(
                g,
                env,
                &status::EnvLogsArgs {
                    service: args.container.clone(),
                    replica: args.replica,
                    host: args.host.clone(),
                    tail: args.tail,
                    follow: args.follow,
                    since: args.since.clone(),
                },
                out,
            ),
            None => containers::logs(g, args, out),
        },
        Command::Start(args) => containers::start(g, args, out),
        Command::Stop(args) => containers::stop(g, args, out),
        Command::Kill(args) => containers::kill(g, args, out),
        Command::Exec(args) => containers::exec_cmd(g, args, out),
        Command::Rm(args) => containers::rm(g, args, out),
        Command::Push(args) => registry::push(g, args, out),
        Command::Pull(args) => registry::pull(g, args, out),
        Command::Copy(args) => registry::copy(g, args, out),
        Command::Login(args) => registry::login(g, args, out),
        Command::Logout(args) => registry::logout(g, args, out),
        Command::Deploy(args) => deploy::deploy(g, args, out),
        Command::Status(args) => status::status(g, args, out),
        Command::Down(args) => deploy::down(g, args, out),
        Command::Rollback(args) => deploy::rollback(g, args, out),
        Command::Agent(args) => agents::agent(g, args, out),
        Command::Releases(args) => status::releases(g, args, out),
        Command::Promote(args) => promote::promote(g, args, out),
        Command::Diff(args) => diff::run(g, args, out),
        Command::Scale(args) => deploy::scale(g, args, out),
        Command::Router { dir, ready } => {
            std::process::exit(crate::deploy::router::run(dir, &g.store_dir(), *ready))
        }
        Command::Network(cmd) => network::network(g, cmd, out),
        Command::Volume(cmd) => network::volume(g, cmd, out),
        Command::Supervise { id, ready } => {
            std::process::exit(crate::runtime::supervisor::run(&g.store_dir(), id, *ready))
        }
        Command::ContainerInit { pid, ready, status } => {
            crate::runtime::init::run(*pid, *ready, *status)
        }
        Command::Config(args) => config::run(g, args, out),
        Command::Completions(args) => completions::run_completions(args, out),
        Command::Man(args) => completions::run_man(args, out),
    }
}

/// `--json` given to a command whose output is not berth's to shape.
pub(crate) fn no_json(what: &str) -> CliError {
    CliError::invalid(miette::miette!("--json does not apply to {what}"))
}

/// `1.2 MB`-style sizes (decimal units, as Docker prints them).
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1000.0 && unit < UNITS.len() - 1 {
        v /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    /// clap's own consistency checks (unique short flags, existing conflicts) over every
    /// subcommand, which otherwise fire only when a command is run.
    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
