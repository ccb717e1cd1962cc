//! Health checks of a container, from the host: an HTTP GET that must answer 2xx or 3xx,
//! a TCP connection that must be accepted, or a command run in the container (through
//! `exec`) that must exit 0. A container is healthy at its first passing probe; failures
//! count only after the start period, and `retries` consecutive ones make it unhealthy.
//! A deploy waits for a new replica's first pass ([`wait_healthy`]); after that the
//! container's supervisor keeps probing ([`HealthState`]), for replicas and for
//! `berth run -d` containers whose image has a HEALTHCHECK ([`Check::from_image`]).

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// What a probe checks (a serialisable copy of the manifest's, for the agent protocol).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "kind")]
pub enum Probe {
    /// HTTP GET `path` on `port`.
    Http {
        /// Request path.
        path: String,
        /// Container port.
        port: u16,
    },
    /// TCP connect to `port`.
    Tcp {
        /// Container port.
        port: u16,
    },
    /// A command in the container.
    Exec {
        /// argv.
        command: Vec<String>,
    },
}

/// A health check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Check {
    /// The probe.
    pub probe: Probe,
    /// Between probes.
    pub interval: Duration,
    /// Per probe.
    pub timeout: Duration,
    /// Consecutive failures that make a replica unhealthy.
    pub retries: u32,
    /// Grace after start.
    pub start_period: Duration,
}

impl Check {
    /// Docker's defaults for what a HEALTHCHECK leaves out.
    const IMAGE_INTERVAL: Duration = Duration::from_secs(30);
    const IMAGE_TIMEOUT: Duration = Duration::from_secs(30);
    const IMAGE_RETRIES: u32 = 3;

    /// The check an image's config declares (`Healthcheck`, as Docker writes it: `Test`
    /// `["CMD", …]`, `["CMD-SHELL", "…"]` or `["NONE"]`, durations in nanoseconds), with
    /// the image's shell for CMD-SHELL. `None` without one, or with NONE.
    pub fn from_image(config: &serde_json::Value, shell: &[String]) -> Option<Check> {
        let hc = config.get("Healthcheck")?;
        let test: Vec<String> = serde_json::from_value(hc.get("Test")?.clone()).ok()?;
        let command = match test.split_first()? {
            (kind, rest) if kind == "CMD" && !rest.is_empty() => rest.to_vec(),
            (kind, [line]) if kind == "CMD-SHELL" => {
                let mut argv = if shell.is_empty() {
                    vec!["/bin/sh".to_string(), "-c".to_string()]
                } else {
                    shell.to_vec()
                };
                argv.push(line.clone());
                argv
            }
            _ => return None,
        };
        let nanos = |k: &str, default: Duration| {
            hc.get(k)
                .and_then(serde_json::Value::as_u64)
                .filter(|n| *n > 0)
                .map_or(default, Duration::from_nanos)
        };
        Some(Check {
            probe: Probe::Exec { command },
            interval: nanos("Interval", Check::IMAGE_INTERVAL),
            timeout: nanos("Timeout", Check::IMAGE_TIMEOUT),
            retries: hc
                .get("Retries")
                .and_then(serde_json::Value::as_u64)
                .filter(|n| *n > 0)
                .map_or(Check::IMAGE_RETRIES, |n| n.min(u64::from(u32::MAX)) as u32),
            start_period: nanos("StartPeriod", Duration::ZERO),
        })
    }
}

/// Where a container stands with its health check, as its supervisor records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    /// No probe has passed yet since it started.
    Starting,
    /// The last probe passed.
    Healthy,
    /// `retries` probes in a row failed.
    Unhealthy,
}

impl std::fmt::Display for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Health::Starting => "starting",
            Health::Healthy => "healthy",
            Health::Unhealthy => "unhealthy",
        })
    }
}

/// A container's health record: its state, the failures in a row, the last failure.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthState {
    /// Where it stands.
    pub status: Health,
    /// Probes failed in a row (after the start period).
    pub failing_streak: u32,
    /// What the last failing probe said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

impl HealthState {
    /// A container that has just started.
    pub fn starting() -> HealthState {
        HealthState {
            status: Health::Starting,
            failing_streak: 0,
            last_error: None,
        }
    }

    /// Takes one probe's result (`in_start_period`: failures do not count yet); returns
    /// whether anything changed.
    pub fn record(
        &mut self,
        result: Result<(), String>,
        check: &Check,
        in_start_period: bool,
    ) -> bool {
        let before = self.clone();
        match result {
            Ok(()) => {
                self.status = Health::Healthy;
                self.failing_streak = 0;
            }
            Err(e) => {
                self.last_error = Some(e);
                if !in_start_period {
                    self.failing_streak += 1;
                    if self.failing_streak >= check.retries.max(1) {
                        self.status = Health::Unhealthy;
                    }
                }
            }
        }
        *self != before
    }
}

/// A connection to a replica: made in the containers' network namespace (see
/// [`super::rootless::in_network`]).
fn connect(addr: &SocketAddr, timeout: std::time::Duration) -> std::io::Result<TcpStream> {
    super::rootless::in_network(|| TcpStream::connect_timeout(addr, timeout))
}

/// One probe against a replica at `ip`; `exec` runs a command in it and returns its exit
/// code.
pub fn probe(
    check: &Check,
    ip: Option<IpAddr>,
    exec: &dyn Fn(&[String]) -> Result<i32, String>,
) -> Result<(), String> {
    let addr = |port: u16| {
        ip.map(|ip| SocketAddr::new(ip, port))
            .ok_or_else(|| "the replica has no address".to_string())
    };
    match &check.probe {
        Probe::Tcp { port } => connect(&addr(*port)?, check.timeout)
            .map(drop)
            .map_err(|e| format!("tcp {port}: {e}")),
        Probe::Http { path, port } => {
            let a = addr(*port)?;
            let mut s = connect(&a, check.timeout)
                .map_err(|e| format!("GET {path} on port {port}: {e}"))?;
            s.set_read_timeout(Some(check.timeout)).ok();
            s.set_write_timeout(Some(check.timeout)).ok();
            // One write: a request in pieces can meet a server that answers the first.
            let request =
                format!("GET {path} HTTP/1.0\r\nHost: {a}\r\nUser-Agent: berth-health\r\n\r\n");
            s.write_all(request.as_bytes())
                .map_err(|e| format!("GET {path}: {e}"))?;
            // The status line, however the answer is split into reads.
            let mut head = [0u8; 64];
            let mut n = 0;
            while n < head.len() && !head[..n].contains(&b'\n') {
                match s
                    .read(&mut head[n..])
                    .map_err(|e| format!("GET {path}: {e}"))?
                {
                    0 => break,
                    k => n += k,
                }
            }
            let line = String::from_utf8_lossy(&head[..n]);
            let status: u16 = line
                .split(' ')
                .nth(1)
                .and_then(|c| c.parse().ok())
                .ok_or_else(|| format!("GET {path}: not an HTTP answer"))?;
            if (200..400).contains(&status) {
                Ok(())
            } else {
                Err(format!("GET {path} answered {status}"))
            }
        }
        Probe::Exec { command } => match exec(command)? {
            0 => Ok(()),
            code => Err(format!("{} exited {code}", command.join(" "))),
        },
    }
}

/// Probes until the replica passes (Ok), fails `retries` times in a row after the start
/// period, or `deadline` passes (Err with the last failure). `alive` says whether the
/// replica still runs.
pub fn wait_healthy(
    check: &Check,
    ip: Option<IpAddr>,
    deadline: Instant,
    alive: &dyn Fn() -> bool,
    exec: &dyn Fn(&[String]) -> Result<i32, String>,
) -> Result<(), String> {
    let started = Instant::now();
    let mut failures = 0;
    loop {
        if !alive() {
            return Err("the replica exited".into());
        }
        match probe(check, ip, exec) {
            Ok(()) => return Ok(()),
            Err(e) => {
                if started.elapsed() >= check.start_period {
                    failures += 1;
                    if failures >= check.retries.max(1) {
                        return Err(e);
                    }
                }
                if Instant::now() + check.interval > deadline {
                    return Err(format!("not healthy before the deadline: {e}"));
                }
            }
        }
        std::thread::sleep(check.interval);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(probe: Probe) -> Check {
        Check {
            probe,
            interval: Duration::from_millis(20),
            // Generous: the suite runs containers beside this test.
            timeout: Duration::from_secs(3),
            retries: 3,
            start_period: Duration::ZERO,
        }
    }

    #[test]
    fn http_and_tcp_probes_judge_real_servers() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for (i, s) in l.incoming().enumerate() {
                let mut s = s.unwrap();
                // The whole request, so closing does not reset the connection.
                let mut req = Vec::new();
                let mut buf = [0u8; 256];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                let status = if i == 0 { "500 Oops" } else { "200 OK" };
                let _ = write!(s, "HTTP/1.0 {status}\r\n\r\n");
            }
        });
        let ip = Some("127.0.0.1".parse().unwrap());
        let no_exec = |_: &[String]| -> Result<i32, String> { Err("no exec".into()) };
        let http = check(Probe::Http {
            path: "/".into(),
            port,
        });
        assert!(probe(&http, ip, &no_exec).unwrap_err().contains("500"));
        let deadline = Instant::now() + Duration::from_secs(5);
        wait_healthy(&http, ip, deadline, &|| true, &no_exec).unwrap();
        assert!(probe(&check(Probe::Tcp { port }), ip, &no_exec).is_ok());
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let dead = closed.local_addr().unwrap().port();
        drop(closed);
        let err = wait_healthy(
            &check(Probe::Tcp { port: dead }),
            ip,
            deadline,
            &|| true,
            &no_exec,
        )
        .unwrap_err();
        assert!(err.contains("tcp"), "{err}");
        let exec = check(Probe::Exec {
            command: vec!["true".into()],
        });
        assert!(probe(&exec, ip, &|_| Ok(0)).is_ok());
        assert!(probe(&exec, ip, &|_| Ok(1)).is_err());
    }

    #[test]
    fn image_healthchecks_read_as_docker_writes_them() {
        let cfg = serde_json::json!({"Healthcheck": {"Test": ["CMD-SHELL", "wget -q -O- localhost"], "Interval": 2_000_000_000u64, "Retries": 5}});
        let c = Check::from_image(&cfg, &[]).unwrap();
        assert_eq!(
            c.probe,
            Probe::Exec {
                command: vec![
                    "/bin/sh".into(),
                    "-c".into(),
                    "wget -q -O- localhost".into()
                ]
            }
        );
        assert_eq!(
            (c.interval, c.timeout, c.retries, c.start_period),
            (
                Duration::from_secs(2),
                Duration::from_secs(30),
                5,
                Duration::ZERO
            )
        );
        let cmd = serde_json::json!({"Healthcheck": {"Test": ["CMD", "true"]}});
        assert_eq!(
            Check::from_image(&cmd, &[]).unwrap().probe,
            Probe::Exec {
                command: vec!["true".into()]
            }
        );
        for none in [
            serde_json::json!({"Healthcheck": {"Test": ["NONE"]}}),
            serde_json::json!({"Healthcheck": {"Test": ["CMD"]}}),
            serde_json::json!({}),
        ] {
            assert!(Check::from_image(&none, &[]).is_none(), "{none}");
        }
    }

    #[test]
    fn health_turns_after_retries_failures_in_a_row() {
        let c = check(Probe::Tcp { port: 1 });
        let mut h = HealthState::starting();
        assert!(!h.record(Err("x".into()), &c, true) || h.status == Health::Starting);
        assert_eq!((h.status, h.failing_streak), (Health::Starting, 0));
        h.record(Ok(()), &c, false);
        assert_eq!(h.status, Health::Healthy);
        h.record(Err("a".into()), &c, false);
        h.record(Err("b".into()), &c, false);
        assert_eq!(h.status, Health::Healthy, "two of three");
        h.record(Err("c".into()), &c, false);
        assert_eq!((h.status, h.failing_streak), (Health::Unhealthy, 3));
        assert_eq!(h.last_error.as_deref(), Some("c"));
        h.record(Ok(()), &c, false);
        assert_eq!((h.status, h.failing_streak), (Health::Healthy, 0));
    }
}
