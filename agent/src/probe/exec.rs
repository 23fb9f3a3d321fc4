//! exec actions: a command run in the container through the runtime, its output captured.

use super::action::ActionError;
use super::{Outcome, Target};
use k8s_openapi::api::core::v1::{Container, ExecAction};
use std::collections::HashMap;
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
    let cmd = expand_static(e.command.as_deref().unwrap_or_default(), &target.container);
    match run(target, &cmd, Some(timeout)).await {
        Ok(x) if x.timed_out => Outcome::Failure(format!("command {:?} timed out", cmd.join(" "))),
        Ok(x) if x.exit_code == 0 => Outcome::Success,
        Ok(x) => Outcome::Failure(x.output),
        Err(e) => Outcome::Failure(e.to_string()),
    }
}

/// `$(VAR)` in a probe's command expanded from the container's `env` as written, as kubelet
/// does: a `value` is used verbatim and a `valueFrom` variable counts as empty.
pub fn expand_static(cmd: &[String], c: &Container) -> Vec<String> {
    let vars: HashMap<&str, &str> = c
        .env
        .iter()
        .flatten()
        .map(|v| (v.name.as_str(), v.value.as_deref().unwrap_or_default()))
        .collect();
    cmd.iter()
        .map(|s| crate::env::expand(s, |k| vars.get(k).map(|v| v.to_string())))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::expand_static;
    use k8s_openapi::api::core::v1::{Container, EnvVar, EnvVarSource, ObjectFieldSelector};

    #[test]
    fn probe_commands_see_only_static_values() {
        let var = |name: &str, value: &str| EnvVar {
            name: name.into(),
            value: Some(value.into()),
            ..Default::default()
        };
        let c = Container {
            env: Some(vec![
                var("FILE", "/tmp/up"),
                var("NESTED", "$(FILE)"),
                EnvVar {
                    name: "POD".into(),
                    value_from: Some(EnvVarSource {
                        field_ref: Some(ObjectFieldSelector {
                            field_path: "metadata.name".into(),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
            ]),
            ..Default::default()
        };
        let cmd: Vec<String> = [
            "cat",
            "$(FILE)",
            "$(NESTED)",
            "[$(POD)]",
            "$(NONE)",
            "$$(FILE)",
        ]
        .map(String::from)
        .into();
        assert_eq!(
            expand_static(&cmd, &c),
            ["cat", "/tmp/up", "$(FILE)", "[]", "$(NONE)", "$(FILE)"]
        );
    }
}
