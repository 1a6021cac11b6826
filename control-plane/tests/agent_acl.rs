//! The Redis ACL that `docs/agent.md` gives agents, applied as written on a private Redis: an
//! agent's whole life (register, heartbeat, claims over few and many classes, progress,
//! complete-and-claim, fail, release, cancel, deregister) runs under it, while loading code and
//! touching keys outside emp's hash tag are refused; once the functions are gone, the agent is
//! told so plainly until the control plane loads them again.

mod support;

use std::time::Duration;

use emp_shared::dispatch::bench::{class_id, new_job};
use emp_shared::dispatch::{
    AgentState, ClaimOutcome, Dispatch, DispatchConfig, DispatchError, Fenced, Heartbeat, Progress,
    QueueLimit, RegisterOutcome, Registration,
};
use redis::aio::ConnectionManager;
use uuid::Uuid;

/// The `ACL SETUSER` command in docs/agent.md, with its password and prefix filled in.
fn documented_acl(password: &str) -> Vec<String> {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/agent.md"))
        .expect("docs/agent.md");
    let start = doc.find("ACL SETUSER").expect("an ACL SETUSER block");
    let block = &doc[start..start + doc[start..].find("```").expect("the block's end")];
    block
        .split_whitespace()
        .skip(1) // ACL
        .map(|word| match word {
            ">CHANGE-ME" => format!(">{password}"),
            other => other.to_owned(),
        })
        .collect()
}

async fn connect(url: &str) -> ConnectionManager {
    let client = redis::Client::open(url).unwrap();
    ConnectionManager::new(client).await.unwrap()
}

#[tokio::test]
async fn an_agent_lives_its_whole_life_under_the_documented_acl() {
    let server = support::private_redis::PrivateRedis::start();
    let mut admin = connect(&server.url()).await;
    let acl = documented_acl("agent-secret");
    let _: () = redis::cmd("ACL")
        .arg(&acl)
        .query_async(&mut admin)
        .await
        .unwrap();
    let mut agent = connect(&format!(
        "redis://emp-agent:agent-secret@127.0.0.1:{}",
        server.port
    ))
    .await;

    // The control plane (a full user) loads the functions and queues work: one job of each of
    // 6 classes, so the claim walks the heads index (more than 4 classes) as well.
    let d = Dispatch::new("emp").unwrap();
    d.load_all(&mut admin).await.unwrap();
    d.set_config(&mut admin, &DispatchConfig::default())
        .await
        .unwrap();
    d.init_epoch(&mut admin, "e1").await.unwrap();
    let classes: Vec<String> = (1..=6).map(class_id).collect();
    let user = Uuid::now_v7();
    for class in classes.iter().chain(&classes[..2]) {
        d.enqueue(&mut admin, &new_job(user, class), QueueLimit::Enforce)
            .await
            .unwrap();
    }

    // The agent's side, all through FCALL.
    let registration = Registration {
        candidate_id: Uuid::now_v7(),
        external_id: "box-acl".into(),
        provider: "local".into(),
        region: "test".into(),
        capabilities_json: "{}".into(),
        max_slots: 2,
    };
    let RegisterOutcome::Registered { machine_id: m, .. } =
        d.register(&mut agent, &registration).await.unwrap()
    else {
        panic!("restoring")
    };
    let claim = |outcome: ClaimOutcome| match outcome {
        ClaimOutcome::Claimed(job) => *job,
        other => panic!("expected a claim, got {other:?}"),
    };
    // Jobs were queued, so their wake tokens are there: BLPOP answers at once.
    d.wait_for_work(&mut agent, &classes[..1], Duration::from_secs(1))
        .await
        .unwrap();
    let few = claim(
        d.claim(&mut agent, &m, &Uuid::now_v7(), &classes[..1])
            .await
            .unwrap(),
    );
    let many = claim(
        d.claim(&mut agent, &m, &Uuid::now_v7(), &classes)
            .await
            .unwrap(),
    );
    let beat = Heartbeat {
        machine_id: m,
        state: AgentState::Ready,
        running: vec![few.execution_id, many.execution_id],
        gpu_stats_json: "{}".into(),
    };
    d.heartbeat(&mut agent, &beat).await.unwrap();
    let progress = Progress {
        value: 1,
        max: 2,
        node: None,
    };
    assert!(matches!(
        d.progress(&mut agent, &m, &few.execution_id, &progress)
            .await
            .unwrap(),
        Fenced::Accepted(_)
    ));
    let next = d
        .complete_and_claim(
            &mut agent,
            &m,
            &few.execution_id,
            "[]",
            &Uuid::now_v7(),
            &classes,
        )
        .await
        .unwrap();
    assert_eq!(next.completed, Fenced::Accepted(()));
    let next = claim(next.next);
    assert!(matches!(
        d.fail(&mut agent, &m, &next.execution_id, "{}", false)
            .await
            .unwrap(),
        Fenced::Accepted(_)
    ));
    assert!(matches!(
        d.release(&mut agent, &m, &many.execution_id).await.unwrap(),
        Fenced::Accepted(_)
    ));
    let again = claim(
        d.claim(&mut agent, &m, &Uuid::now_v7(), &classes)
            .await
            .unwrap(),
    );
    d.cancel(&mut admin, &again.job_id).await.unwrap();
    assert!(matches!(
        d.cancelled(&mut agent, &m, &again.execution_id)
            .await
            .unwrap(),
        Fenced::Accepted(_)
    ));
    d.classes(&mut agent).await.unwrap();
    d.deregister(&mut agent, &m).await.unwrap();

    // What the ACL keeps from an agent: loading code, and keys of other deployments.
    assert!(matches!(
        d.load_all(&mut agent).await,
        Err(DispatchError::ScriptNotLoaded { .. })
    ));
    let foreign: redis::RedisResult<Option<String>> = redis::cmd("GET")
        .arg("{other}:config")
        .query_async(&mut agent)
        .await;
    assert!(foreign.is_err(), "{foreign:?}");

    // Redis loses its functions: the agent hears that they are missing, not a bare error…
    let _: () = redis::cmd("FUNCTION")
        .arg("FLUSH")
        .query_async(&mut admin)
        .await
        .unwrap();
    assert!(matches!(
        d.register(&mut agent, &registration).await,
        Err(DispatchError::ScriptNotLoaded { .. })
    ));
    // …and works again once the control plane has loaded them, which its next call does by
    // itself (the function is missing: it loads the library and retries).
    d.enqueue(&mut admin, &new_job(user, &classes[0]), QueueLimit::Enforce)
        .await
        .unwrap();
    tokio::time::timeout(
        Duration::from_secs(5),
        d.register(&mut agent, &registration),
    )
    .await
    .unwrap()
    .unwrap();
}
