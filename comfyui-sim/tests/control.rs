//! Queue control while a prompt runs: interrupt (at a node start and at a progress step),
//! deleting pending prompts, the queue listing, and stopping the simulator.

mod common;

use std::time::Duration;

use common::{Events, Sim, basic_graph, slow_graph, unique_prefix};
use serde_json::json;

/// Long enough per node that a few HTTP calls land while a 1024x1024 blur runs.
const SLOW: Duration = Duration::from_millis(60);

#[tokio::test]
async fn interrupt_takes_effect_when_the_next_node_starts() {
    let sim = Sim::start(SLOW).await;
    let mut events = Events::connect(&sim).await;
    let (prompt_id, status, _) = sim.submit(&slow_graph(6, 5), &events.client_id).await;
    assert_eq!(status, 200);
    events.wait_executing(&prompt_id, Some("2")).await;

    let response = sim
        .post_json("/interrupt", &json!({"prompt_id": prompt_id}))
        .await;
    assert_eq!(response.status(), 200);
    assert!(response.bytes().await.unwrap().is_empty());
    events.wait_done(&prompt_id).await;

    let timeline = events.timeline(&prompt_id);
    assert!(
        !timeline
            .iter()
            .any(|t| t == "execution_success" || t == "executed"),
        "{timeline:?}"
    );
    let n = timeline.len();
    assert_eq!(
        timeline[n - 2..],
        ["execution_interrupted", "executing:null"],
        "{timeline:?}"
    );
    // The node announced just before the interrupt is the one it names, and it never ran.
    let interrupted = events.one(&prompt_id, "execution_interrupted");
    assert_eq!(
        json!(timeline[n - 3]),
        json!(format!(
            "executing:{}",
            interrupted["node_id"].as_str().unwrap()
        ))
    );
    // Blur 2 was running: it finishes, and a later node (normally blur 3) starts and stops.
    let stopped_at: usize = interrupted["node_id"].as_str().unwrap().parse().unwrap();
    assert!(
        stopped_at >= 3,
        "the running node is never cut short: {interrupted}"
    );
    let ran: Vec<String> = (1..stopped_at).map(|n| n.to_string()).collect();
    assert_eq!(interrupted["executed"], json!(ran));
    assert!(interrupted["node_type"] == "ImageBlur" || interrupted["node_type"] == "SaveImage");
    // ComfyUI sends `status` between execution_interrupted and executing null.
    let all: Vec<&str> = events.messages.iter().map(|(k, _)| k.as_str()).collect();
    let at = all
        .iter()
        .rposition(|k| *k == "execution_interrupted")
        .unwrap();
    assert_eq!(all[at + 1..at + 3], ["status", "executing"]);

    let entry = &sim.history(&prompt_id).await[&prompt_id];
    assert_eq!(entry["status"]["status_str"], "error");
    assert_eq!(entry["outputs"], json!({}));

    // The flag does not leak into the next prompt.
    let (next, ..) = sim
        .submit(&basic_graph(&unique_prefix(), 3), &events.client_id)
        .await;
    events.wait_done(&next).await;
    assert!(
        events
            .timeline(&next)
            .contains(&"execution_success".to_string())
    );
}

#[tokio::test]
async fn interrupt_lands_at_a_progress_step_of_the_running_node() {
    let sim = Sim::start(Duration::ZERO).await;
    let mut events = Events::connect(&sim).await;
    let graph =
        json!({"1": {"class_type": "EmpSimSleep", "inputs": {"seconds": 20.0, "steps": 400}}});
    let (prompt_id, ..) = sim.submit(&graph, &events.client_id).await;
    events
        .wait_for("first progress", |kind, data| {
            kind == "progress" && data["prompt_id"] == prompt_id
        })
        .await;
    // No body: a global interrupt.
    let response = sim.http.post(sim.url("/interrupt")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    events.wait_done(&prompt_id).await;
    let interrupted = events.one(&prompt_id, "execution_interrupted");
    assert_eq!(interrupted["node_id"], "1");
    assert_eq!(interrupted["executed"], json!([]));
    assert!(
        events
            .of(&prompt_id)
            .iter()
            .filter(|(k, _)| k == "progress")
            .count()
            < 400
    );
}

#[tokio::test]
async fn interrupt_spares_a_pending_prompt_and_queue_delete_removes_it() {
    let sim = Sim::start(SLOW).await;
    let mut events = Events::connect(&sim).await;
    let (slow, ..) = sim.submit(&slow_graph(6, 9), &events.client_id).await;
    events.wait_executing(&slow, Some("2")).await;
    let pending_graph = basic_graph(&unique_prefix(), 4);
    let (pending, status, body) = sim.submit(&pending_graph, &events.client_id).await;
    assert_eq!(status, 200);

    // The listing: [number, prompt_id, graph, extra_data, outputs].
    let queue = sim.get_json("/queue").await;
    assert_eq!(queue["queue_running"][0][1], json!(slow));
    let item = &queue["queue_pending"][0];
    assert_eq!(item[0], body["number"]);
    assert_eq!(item[1], json!(pending));
    assert_eq!(item[2], pending_graph);
    assert_eq!(item[3]["client_id"], json!(events.client_id));
    assert_eq!(item[4], json!(["3"]));

    sim.post_json("/interrupt", &json!({"prompt_id": pending}))
        .await;
    let (running, waiting) = sim.queue_ids().await;
    assert_eq!(
        (running, waiting.clone()),
        (vec![slow.clone()], vec![pending.clone()])
    );

    let response = sim
        .post_json("/queue", &json!({"delete": [pending, slow]}))
        .await;
    assert_eq!(response.status(), 200);
    let (running, waiting) = sim.queue_ids().await;
    assert_eq!(
        running,
        std::slice::from_ref(&slow),
        "delete never touches the running prompt"
    );
    assert!(waiting.is_empty());

    sim.post_json("/interrupt", &json!({"prompt_id": slow}))
        .await;
    events.wait_done(&slow).await;
    let (marker, ..) = sim
        .submit(&basic_graph(&unique_prefix(), 8), &events.client_id)
        .await;
    events.wait_done(&marker).await;
    assert_eq!(sim.history(&pending).await, json!({}));
    assert!(
        events.of(&pending).is_empty(),
        "a deleted prompt sends nothing"
    );
}

#[tokio::test]
async fn queue_clear_empties_the_pending_list() {
    let sim = Sim::start(SLOW).await;
    let mut events = Events::connect(&sim).await;
    let (slow, ..) = sim.submit(&slow_graph(4, 1), &events.client_id).await;
    events.wait_executing(&slow, Some("2")).await;
    for color in 0..3 {
        sim.submit(&basic_graph(&unique_prefix(), color), &events.client_id)
            .await;
    }
    assert_eq!(sim.queue_ids().await.1.len(), 3);
    sim.post_json("/queue", &json!({"clear": true})).await;
    assert_eq!(sim.queue_ids().await, (vec![slow.clone()], vec![]));
    assert_eq!(
        sim.get_json("/prompt").await,
        json!({"exec_info": {"queue_remaining": 1}})
    );
    sim.post_json("/interrupt", &json!({})).await;
    events.wait_done(&slow).await;
}

#[tokio::test]
async fn stop_ends_a_running_prompt_and_closes_sockets() {
    let sim = Sim::start(SLOW).await;
    let mut events = Events::connect(&sim).await;
    let (slow, ..) = sim.submit(&slow_graph(8, 2), &events.client_id).await;
    events.wait_executing(&slow, Some("2")).await;
    let common::Sim { handle, .. } = sim;
    tokio::time::timeout(common::WAIT, handle.stop())
        .await
        .expect("stops in time")
        .expect("stops cleanly");
}
