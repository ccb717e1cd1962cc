//! A promotion: the image the source environment runs, moved into the target. [`plan`]
//! gathers the evidence (the source's ledger and hosts, the required environments'
//! ledgers) and runs the gates; [`run`] refuses unless they pass or are forced with a
//! reason, then makes the release: copied by digest, read back, rolled out, recorded.

use serde::Serialize;

use super::ledger::{Kind, Release, current};
use super::release::{
    Environment, ImageOrigin, ReleaseError, ReleaseProgress, ReleaseRequest, Released,
    env_reference,
};
use super::{Evidence, Gate, HostState, check};
use crate::deploy::ReleasePlan;
use crate::store::Digest;

/// What a promotion would do.
#[derive(Debug, Clone, Serialize)]
pub struct PromotionPlan {
    /// The source environment.
    pub from: String,
    /// The target environment.
    pub to: String,
    /// The source's current release.
    pub released: Release,
    /// The image.
    pub digest: Digest,
    /// Every gate's verdict.
    pub gates: Vec<Gate>,
    /// The target's plan for the image.
    pub plan: ReleasePlan,
    /// Where the image is copied from.
    #[serde(skip)]
    pub origin: ImageOrigin,
}

impl PromotionPlan {
    /// The gates that refuse it.
    pub fn refused(&self) -> Vec<&Gate> {
        self.gates.iter().filter(|g| !g.passed).collect()
    }
}

/// Why a promotion cannot be planned or made.
#[derive(Debug, thiserror::Error)]
pub enum PromoteError {
    /// The source has nothing to promote.
    #[error("{0} has no release to promote")]
    NothingReleased(String),
    /// Gates refuse it and it was not forced.
    #[error("promotion to {to} refused by {}", refused.join("; "))]
    Refused {
        /// The target.
        to: String,
        /// Each refusing gate, with why.
        refused: Vec<String>,
    },
    /// The release failed (or could not start).
    #[error(transparent)]
    Release(#[from] ReleaseError),
}

/// Gathers the evidence and checks the gates for promoting `source`'s current release into
/// `target`. `required` holds the ledgers of the target's `require` environments.
pub fn plan(
    source: &Environment,
    target: &Environment,
    required: &[(String, Vec<Release>)],
) -> Result<PromotionPlan, PromoteError> {
    let from = source.config.environment.clone();
    let history = source
        .history()
        .map_err(|e| PromoteError::Release(ReleaseError::Ledger(e)))?;
    let Some(released) = current(&history).cloned() else {
        return Err(PromoteError::NothingReleased(from));
    };
    let digest = released.digest.clone();
    let hosts: Vec<HostState> = source
        .host_states()
        .into_iter()
        .map(|(host, state)| match state {
            Ok(s) => {
                let (running, total) = s
                    .services
                    .values()
                    .fold((0, 0), |(a, b), c| (a + c.running, b + c.total));
                HostState {
                    host,
                    digest: s.digest,
                    running,
                    total,
                    error: None,
                }
            }
            Err(e) => HostState {
                host,
                digest: None,
                running: 0,
                total: 0,
                error: Some(e.message),
            },
        })
        .collect();
    let gates = check(&Evidence {
        source: &from,
        source_history: &history,
        digest: &digest,
        hosts: &hosts,
        soak: target.config.soak.map(|s| s.0),
        required,
        now: jiff::Timestamp::now(),
    });
    let plan = ReleasePlan::for_environment(&target.config, &digest, released.revision.clone());
    let origin =
        ImageOrigin::Environment(env_reference(&source.config).map_err(PromoteError::Release)?);
    Ok(PromotionPlan {
        from,
        to: target.config.environment.clone(),
        released,
        digest,
        gates,
        plan,
        origin,
    })
}

/// Makes the promotion planned: refused unless every gate passed or `force` gives a
/// reason (recorded with the gates it overrode).
pub fn run(
    target: &Environment,
    p: &PromotionPlan,
    force: Option<&str>,
    put_back: bool,
    extra: Vec<String>,
    progress: &dyn ReleaseProgress,
) -> Result<Released, PromoteError> {
    let refused = p.refused();
    if !refused.is_empty() && force.is_none() {
        return Err(PromoteError::Refused {
            to: p.to.clone(),
            refused: refused
                .iter()
                .map(|g| format!("{} ({})", g.name, g.detail))
                .collect(),
        });
    }
    let request = ReleaseRequest {
        kind: Kind::Promote,
        plan: p.plan.clone(),
        host_rollback: None,
        origin: p.origin.clone(),
        source: Some(p.from.clone()),
        forced: if force.is_some() {
            refused.iter().map(|g| g.name.to_string()).collect()
        } else {
            Vec::new()
        },
        reason: force.map(str::to_string),
        put_back,
    };
    Ok(target.release(request, extra, progress)?)
}
