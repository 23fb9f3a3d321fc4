//! exec actions: a command run in the container through the runtime, its output captured.

use super::action::ActionError;
use super::{Outcome, Target};
use k8s_openapi::api::core::v1::ExecAction;
use std::time::{Duration, Instant};

/// How an exec ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exec {
    pub exit_code: i32,
    /// stdout, then stderr.
    pub output: String,
    pub timed_out: bool,
}

/// Runs `cmd` in the target container; killed after `timeout`.
pub async fn run(
    target: &Target,
    cmd: &[String],
    timeout: Option<Duration>,
) -> Result<Exec, ActionError> {
    if cmd.is_empty() {
        return Err(ActionError::NoCommand);
    }
    let (rt, id, cmd) = (target.rt.clone(), target.container_id.clone(), cmd.to_vec());
    let began = Instant::now();
    let out = tokio::task::spawn_blocking(move || {
        runtime::container::exec(rt.paths(), &id, &cmd, timeout)
    })
    .await??;
    let mut output = String::from_utf8_lossy(&out.stdout).into_owned();
    output.push_str(&String::from_utf8_lossy(&out.stderr));
    // The runtime SIGKILLs the command at the timeout: 128 + 9.
    let timed_out = timeout.is_some_and(|t| began.elapsed() >= t) && out.exit_code == 137;
    Ok(Exec {
        exit_code: out.exit_code,
        output,
        timed_out,
    })
}

/// An exec probe: exit code 0 is success; otherwise the output is the failure message.
pub async fn probe(target: &Target, e: &ExecAction, timeout: Duration) -> Outcome {
    let cmd = e.command.clone().unwrap_or_default();
    match run(target, &cmd, Some(timeout)).await {
        Ok(x) if x.timed_out => Outcome::Failure(format!("command {:?} timed out", cmd.join(" "))),
        Ok(x) if x.exit_code == 0 => Outcome::Success,
        Ok(x) => Outcome::Failure(x.output),
        Err(e) => Outcome::Failure(e.to_string()),
    }
}
