//! The Job controller: runs pods until `completions` succeed, at most `parallelism` at once;
//! fails the Job past backoffLimit (failed pods, and container restarts under OnFailure) or
//! activeDeadlineSeconds; backs off between failed pods; deletes finished Jobs after
//! ttlSecondsAfterFinished.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::batch::v1::{Job, JobCondition, JobStatus};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::ResourceExt;
use serde_json::json;

use super::events::Type;
use super::owners::{self, Expectations};
use super::pods;
use super::queue::Action;
use super::{Ctx, Error, Key};

/// The longest pause between a failed pod and its replacement (upstream's six minutes).
const MAX_POD_BACKOFF: Duration = Duration::from_secs(360);

fn has_condition(j: &Job, ty: &str) -> bool {
    j.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == ty && c.status == "True"))
}

fn condition(ty: &str, reason: &str, message: &str) -> JobCondition {
    let now = Time(Timestamp::now());
    JobCondition {
        type_: ty.into(),
        status: "True".into(),
        reason: Some(reason.into()),
        message: Some(message.into()),
        last_probe_time: Some(now.clone()),
        last_transition_time: Some(now),
    }
}

fn finished_at(p: &Pod) -> Option<i64> {
    p.status
        .as_ref()?
        .container_statuses
        .iter()
        .flatten()
        .filter_map(|c| c.state.as_ref()?.terminated.as_ref()?.finished_at.as_ref())
        .map(|t| t.0.as_second())
        .max()
}

pub async fn reconcile(
    ctx: Arc<Ctx>,
    exp: Arc<Expectations<Key>>,
    key: Key,
) -> Result<Action, Error> {
    let (ns, name) = (&key.0, &key.1);
    let (job, all) = match super::owner_and_pods(&ctx, &ctx.jobs, &exp, &key) {
        super::Owner::Gone => return Ok(Action::Done),
        super::Owner::Lagging(action) => return Ok(action),
        super::Owner::Ready(o, pods) => (o, pods),
    };
    let spec = job.spec.clone().unwrap_or_default();
    let uid = job.metadata.uid.clone().unwrap_or_default();
    let mine: Vec<Arc<Pod>> = all
        .iter()
        .filter(|p| owners::controller_of(&p.metadata).is_some_and(|o| o.uid == uid))
        .cloned()
        .collect();
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), ns);
    let now = Timestamp::now();
    let active: Vec<&Arc<Pod>> = mine.iter().filter(|p| pods::is_active(p)).collect();
    let phase =
        |p: &Pod, want: &str| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some(want);
    let succeeded = mine.iter().filter(|p| phase(p, "Succeeded")).count() as i32;
    let failed_pods: Vec<&Arc<Pod>> = mine.iter().filter(|p| phase(p, "Failed")).collect();
    let failed = failed_pods.len() as i32;
    let on_failure = spec
        .template
        .spec
        .as_ref()
        .and_then(|s| s.restart_policy.as_deref())
        == Some("OnFailure");
    let restarts: i32 = if on_failure {
        active
            .iter()
            .filter_map(|p| p.status.as_ref()?.container_statuses.as_ref())
            .flatten()
            .map(|c| c.restart_count)
            .sum()
    } else {
        0
    };
    let mut status = job.status.clone().unwrap_or_default();
    let finished = has_condition(&job, "Complete") || has_condition(&job, "Failed");

    if finished {
        // Finished: stop what still runs, then wait for the TTL, if any.
        for p in &active {
            let _ = api.delete(&p.name_any(), &DeleteParams::default()).await;
        }
        if let (Some(ttl), Some(done)) = (
            spec.ttl_seconds_after_finished,
            status.completion_time.clone().or_else(|| {
                status
                    .conditions
                    .iter()
                    .flatten()
                    .filter(|c| c.status == "True")
                    .filter_map(|c| c.last_transition_time.clone())
                    .max_by_key(|t| t.0)
            }),
        ) {
            let left = done.0.as_second() + ttl as i64 - now.as_second();
            if left <= 0 {
                match jobs.delete(name, &DeleteParams::background()).await {
                    Ok(_) => {}
                    Err(kube::Error::Api(e)) if e.code == 404 => {}
                    Err(e) => return Err(e.into()),
                }
                return Ok(Action::Done);
            }
            return Ok(Action::After(Duration::from_secs(left as u64)));
        }
        return Ok(Action::Done);
    }

    if status.start_time.is_none() && spec.suspend != Some(true) {
        status.start_time = Some(Time(now));
    }
    let completions = spec.completions;
    let parallelism = spec.parallelism.unwrap_or(1).max(0);
    let backoff_limit = spec.backoff_limit.unwrap_or(6);
    let mut requeue = None;
    let mut conditions = status.conditions.clone().unwrap_or_default();
    let fail = |reason: &str, message: &str, conditions: &mut Vec<JobCondition>| {
        conditions.push(condition("FailureTarget", reason, message));
        conditions.push(condition("Failed", reason, message));
    };
    let deadline_hit = spec
        .active_deadline_seconds
        .zip(status.start_time.as_ref())
        .is_some_and(|(d, start)| now.as_second() - start.0.as_second() >= d);
    let complete = completions.is_some_and(|c| succeeded >= c)
        || (completions.is_none() && succeeded > 0 && active.is_empty());
    let mut end = false;
    if failed + restarts > backoff_limit {
        fail(
            "BackoffLimitExceeded",
            "Job has reached the specified backoff limit",
            &mut conditions,
        );
        ctx.events.publish(
            job.as_ref(),
            Type::Warning,
            "BackoffLimitExceeded",
            "Job has reached the specified backoff limit".into(),
        );
        end = true;
    } else if deadline_hit {
        fail(
            "DeadlineExceeded",
            "Job was active longer than specified deadline",
            &mut conditions,
        );
        ctx.events.publish(
            job.as_ref(),
            Type::Warning,
            "DeadlineExceeded",
            "Job was active longer than specified deadline".into(),
        );
        end = true;
    } else if complete {
        conditions.push(condition(
            "SuccessCriteriaMet",
            "CompletionsReached",
            "Reached expected number of succeeded pods",
        ));
        conditions.push(condition(
            "Complete",
            "CompletionsReached",
            "Reached expected number of succeeded pods",
        ));
        status.completion_time = Some(Time(now));
        ctx.events.publish(
            job.as_ref(),
            Type::Normal,
            "Completed",
            "Job completed".into(),
        );
        end = true;
    } else if spec.suspend != Some(true) {
        let want = match completions {
            Some(c) => (c - succeeded).min(parallelism).max(0),
            None => parallelism,
        } as usize;
        if active.len() < want {
            // After a failure, the next pod waits base * 2^(failures - 1).
            let last_failure = failed_pods.iter().filter_map(|p| finished_at(p)).max();
            let wait = if failed > 0 {
                ctx.cfg
                    .job_backoff
                    .saturating_mul(1u32 << (failed - 1).min(16) as u32)
                    .min(MAX_POD_BACKOFF)
            } else {
                Duration::ZERO
            };
            let ready_at = last_failure.map_or(0, |t| t + wait.as_secs() as i64);
            if failed > 0 && now.as_second() < ready_at {
                requeue = Some(Duration::from_secs((ready_at - now.as_second()) as u64));
            } else {
                let template = pod_from_template(&job);
                for _ in active.len()..want {
                    match api.create(&PostParams::default(), &template).await {
                        Ok(p) => {
                            exp.created(&key, p.name_any());
                            ctx.events.publish(
                                job.as_ref(),
                                Type::Normal,
                                "SuccessfulCreate",
                                format!("Created pod: {}", p.name_any()),
                            );
                        }
                        Err(e) => {
                            ctx.events.publish(
                                job.as_ref(),
                                Type::Warning,
                                "FailedCreate",
                                format!("Error creating: {}", super::replicaset::api_message(&e)),
                            );
                            return Err(e.into());
                        }
                    }
                }
            }
        } else if active.len() > want {
            for p in &active[want..] {
                exp.deleted(&key, p.name_any());
                let _ = api.delete(&p.name_any(), &DeleteParams::default()).await;
            }
        }
        if let Some(d) = spec.active_deadline_seconds {
            let start = status
                .start_time
                .as_ref()
                .map_or(now.as_second(), |t| t.0.as_second());
            let left = (start + d - now.as_second()).max(1) as u64;
            requeue = Some(requeue.map_or(Duration::from_secs(left), |r: Duration| {
                r.min(Duration::from_secs(left))
            }));
        }
    }
    if end {
        for p in &active {
            let _ = api.delete(&p.name_any(), &DeleteParams::default()).await;
        }
    }
    let still_active = if end { 0 } else { active.len() as i32 };
    let new_status = JobStatus {
        active: Some(still_active),
        succeeded: Some(succeeded),
        failed: Some(failed),
        ready: Some(if end {
            0
        } else {
            active.iter().filter(|p| pods::is_ready(p)).count() as i32
        }),
        terminating: Some(
            mine.iter()
                .filter(|p| p.metadata.deletion_timestamp.is_some())
                .count() as i32,
        ),
        conditions: (!conditions.is_empty()).then_some(conditions),
        uncounted_terminated_pods: Some(Default::default()),
        ..status
    };
    if job.status.as_ref() != Some(&new_status) {
        jobs.patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": new_status})),
        )
        .await?;
    }
    if end && spec.ttl_seconds_after_finished.is_some() {
        requeue = Some(Duration::from_secs(
            spec.ttl_seconds_after_finished.unwrap_or(0).max(0) as u64,
        ));
    }
    Ok(requeue.map_or(Action::Done, Action::After))
}

fn pod_from_template(job: &Job) -> Pod {
    let template = job
        .spec
        .as_ref()
        .map(|s| s.template.clone())
        .unwrap_or_default();
    let mut meta = template.metadata.unwrap_or_default();
    meta.name = None;
    meta.generate_name = Some(format!("{}-", job.name_any()));
    meta.namespace = job.metadata.namespace.clone();
    meta.owner_references = Some(vec![owners::controller_ref(job)]);
    Pod {
        metadata: meta,
        spec: template.spec,
        status: None,
    }
}
