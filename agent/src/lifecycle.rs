//! Lifecycle hooks: postStart right after a container started, preStop before it is sent
//! SIGTERM, with kubelet's failure messages. exec runs in the container, httpGet goes from the
//! node to the pod, sleep waits.

use crate::probe::{exec, http, Action, Target};
use k8s_openapi::api::core::v1::{LifecycleHandler, Pod};
use std::time::Duration;

/// Runs `handler` for the target container, within `budget` when one is given. The error is
/// the message kubelet puts in its FailedPostStartHook / FailedPreStopHook event.
pub async fn run(
    handler: &LifecycleHandler,
    target: &Target,
    pod: &Pod,
    budget: Option<Duration>,
) -> Result<(), String> {
    let Some(action) = Action::of_hook(handler) else {
        return Ok(());
    };
    let name = &target.container.name;
    let pod_ref = crate::status::pod_ref(pod);
    match action {
        Action::Exec(e) => {
            let cmd = e.command.clone().unwrap_or_default();
            let failed = |error: String, output: &str| {
                format!(
                    "Exec lifecycle hook ([{}]) for Container {name:?} in Pod {pod_ref:?} failed - error: {error}, message: {output:?}",
                    cmd.join(" ")
                )
            };
            match exec::run(target, &cmd, budget).await {
                Ok(x) if x.exit_code == 0 => Ok(()),
                Ok(x) => Err(failed(
                    format!(
                        "command '{}' exited with {}: {}",
                        cmd.join(" "),
                        x.exit_code,
                        x.output
                    ),
                    &x.output,
                )),
                Err(e) => Err(failed(e, "")),
            }
        }
        Action::Http(h) => {
            let path = h.path.clone().unwrap_or_default();
            // A hook's answer is not judged by its status code, only reaching it counts.
            let timeout = budget.unwrap_or(Duration::from_secs(3600));
            match http::get(target, &h, timeout, http::HOOK).await {
                Ok(_) => Ok(()),
                Err(e) => Err(format!(
                    "HTTP lifecycle hook ({path}) for Container {name:?} in Pod {pod_ref:?} failed - error: {e}"
                )),
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
