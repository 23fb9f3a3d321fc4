//! Lifecycle hooks: postStart right after a container started, preStop before it is sent
//! SIGTERM, with kubelet's failure messages. exec runs in the container, httpGet goes from the
//! node to the pod, sleep waits.

use crate::probe::{exec, http, Action, ActionError, Target};
use k8s_openapi::api::core::v1::{LifecycleHandler, Pod};
use std::time::Duration;

/// A hook that failed, worded as kubelet's FailedPostStartHook / FailedPreStopHook event.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error("Exec lifecycle hook ([{command}]) for Container {container:?} in Pod {pod:?} failed - error: {error}, message: {output:?}")]
    Exec {
        command: String,
        container: String,
        pod: String,
        #[source]
        error: ExecFailure,
        output: String,
    },
    #[error("HTTP lifecycle hook ({path}) for Container {container:?} in Pod {pod:?} failed - error: {error}")]
    Http {
        path: String,
        container: String,
        pod: String,
        #[source]
        error: ActionError,
    },
}

/// Why an exec hook failed.
#[derive(Debug, thiserror::Error)]
pub enum ExecFailure {
    #[error("command '{command}' exited with {code}: {output}")]
    Exited {
        command: String,
        code: i32,
        output: String,
    },
    #[error(transparent)]
    NotRun(#[from] ActionError),
}

/// Runs `handler` for the target container, within `budget` when one is given.
pub async fn run(
    handler: &LifecycleHandler,
    target: &Target,
    pod: &Pod,
    budget: Option<Duration>,
) -> Result<(), HookError> {
    let Some(action) = Action::of_hook(handler) else {
        return Ok(());
    };
    let name = &target.container.name;
    let pod_ref = crate::status::pod_ref(pod);
    match action {
        Action::Exec(e) => {
            let cmd = e.command.clone().unwrap_or_default();
            let command = cmd.join(" ");
            let (error, output) = match exec::run(target, &cmd, budget).await {
                Ok(x) if x.exit_code == 0 => return Ok(()),
                Ok(x) => (
                    ExecFailure::Exited {
                        command: command.clone(),
                        code: x.exit_code,
                        output: x.output.clone(),
                    },
                    x.output,
                ),
                Err(e) => (e.into(), String::new()),
            };
            Err(HookError::Exec {
                command,
                container: name.clone(),
                pod: pod_ref,
                error,
                output,
            })
        }
        Action::Http(h) => {
            let path = h.path.clone().unwrap_or_default();
            // A hook's answer is not judged by its status code, only reaching it counts.
            let timeout = budget.unwrap_or(Duration::from_secs(3600));
            match http::get(target, &h, timeout, http::HOOK).await {
                Ok(_) => Ok(()),
                Err(error) => Err(HookError::Http {
                    path,
                    container: name.clone(),
                    pod: pod_ref,
                    error,
                }),
            }
        }
        Action::Sleep(s) => {
            let d = Duration::from_secs(s.max(0) as u64);
            tokio::time::sleep(budget.map_or(d, |b| d.min(b))).await;
            Ok(())
        }
        Action::Tcp(_) | Action::Grpc(_) => Ok(()),
    }
}
