//! Runs one prompt and tells its client about it, in ComfyUI's order:
//!
//! `execution_start`, `execution_cached` (every node whose result is reused), then for each
//! node that runs `progress_state`, `executing`, any `progress`, `executed` (when it has UI
//! output); a reused output node only re-sends its old `executed`. The end is
//! `execution_success`, or `execution_error` / `execution_interrupted` naming the node. The
//! worker then writes history and sends `executing: null` (see `worker`).
//!
//! Lifecycle messages go only to the submitting client (none without a `client_id`), except
//! `execution_interrupted`, `progress` and `progress_state`, which ComfyUI broadcasts when the
//! prompt has no client. An interrupt is noticed where ComfyUI notices it: when a node starts
//! (after its `executing`) and at each progress step, never in the middle of other work.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::{Map, Value, json};

use crate::cache::{CacheEntry, OutputCache, Signature, signatures};
use crate::graph::Graph;
use crate::hub::Hub;
use crate::nodes::catalog::Catalog;
use crate::nodes::{
    self, Builtin, ChangeToken, Input, Inputs, NodeCtx, NodeError, NodeKind, NodeValue, Progress,
    RunEnv,
};
use crate::queue::{QueueItem, RunOutcome};
use crate::state::AppState;

/// ComfyUI appends these tips to the message of an out-of-memory error.
const OOM_TIPS: &str = "This error means you ran out of memory on your GPU.\n\nTIPS: If the workflow worked before you might have accidentally set the batch_size to a large number.";

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Why a prompt stopped early.
enum Failure {
    Interrupted {
        node_id: String,
    },
    Error {
        node_id: String,
        exception_type: String,
        exception_message: String,
        traceback: Vec<String>,
        current_inputs: Value,
    },
}

/// Sends one prompt's events and records its lifecycle messages for history.
struct Emitter {
    hub: Arc<Hub>,
    client: Option<String>,
    messages: Vec<Value>,
}

impl Emitter {
    /// ComfyUI's `add_message`: timestamped, kept for history, sent to the client (or to all
    /// when `broadcast` and there is no client).
    fn lifecycle(&mut self, event: &str, mut data: Value, broadcast: bool) {
        data["timestamp"] = json!(now_ms());
        self.messages.push(json!([event, data]));
        if self.client.is_some() || broadcast {
            self.hub.send(event, &data, self.client.as_deref());
        }
    }

    /// Sent only when the prompt has a client.
    fn to_client(&self, event: &str, data: &Value) {
        if let Some(client) = &self.client {
            self.hub.send(event, data, Some(client));
        }
    }
}

/// Per-node progress, sent as `progress_state` / `progress`; also the interrupt check point
/// for nodes that report steps.
struct Tracker {
    hub: Arc<Hub>,
    client: Option<String>,
    prompt_id: String,
    interrupt: Arc<AtomicBool>,
    nodes: Mutex<BTreeMap<String, (f64, f64, &'static str)>>,
}

impl Tracker {
    fn update(&self, node_id: &str, change: impl FnOnce(&mut (f64, f64, &'static str))) {
        let mut nodes = self
            .nodes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        change(
            nodes
                .entry(node_id.to_string())
                .or_insert((0.0, 1.0, "pending")),
        );
        let rendered: Map<String, Value> = nodes
            .iter()
            .filter(|(_, (_, _, state))| *state != "pending")
            .map(|(id, (value, max, state))| {
                let entry = json!({
                    "value": value, "max": max, "state": state, "node_id": id,
                    "prompt_id": self.prompt_id, "display_node_id": id,
                    "parent_node_id": null, "real_node_id": id,
                });
                (id.clone(), entry)
            })
            .collect();
        let data = json!({"prompt_id": self.prompt_id, "nodes": rendered});
        self.hub
            .send("progress_state", &data, self.client.as_deref());
    }

    fn start(&self, node_id: &str) {
        self.update(node_id, |entry| *entry = (0.0, 1.0, "running"));
    }

    fn finish(&self, node_id: &str) {
        self.update(node_id, |entry| *entry = (entry.1, entry.1, "finished"));
    }
}

impl Progress for Tracker {
    fn step(&self, node_id: &str, value: u64, max: u64) -> Result<(), NodeError> {
        if self.interrupt.load(Ordering::SeqCst) {
            return Err(NodeError::Interrupted);
        }
        let data =
            json!({"value": value, "max": max, "prompt_id": self.prompt_id, "node": node_id});
        self.update(node_id, |entry| {
            *entry = (value as f64, max as f64, "running");
        });
        self.hub.send("progress", &data, self.client.as_deref());
        Ok(())
    }
}

/// One prompt's run: its graph, keys and catalogue, and where events go.
struct Run<'a> {
    item: &'a QueueItem,
    graph: Arc<Graph>,
    catalog: Catalog,
    signatures: HashMap<String, Signature>,
    emitter: Emitter,
    tracker: Arc<Tracker>,
    executed: Vec<String>,
}

pub struct Executor {
    state: Arc<AppState>,
    env: Arc<RunEnv>,
}

impl Executor {
    pub fn new(state: Arc<AppState>) -> Executor {
        let env = Arc::new(RunEnv {
            step_delay: state.config.step_delay,
            dirs: state.dirs.clone(),
            disable_metadata: state.config.disable_metadata,
        });
        Executor { state, env }
    }

    /// Runs `item` to the end (success, error or interrupt), using and refilling `cache`.
    pub async fn execute(&self, cache: &mut OutputCache, item: &QueueItem) -> RunOutcome {
        // Each prompt starts uninterrupted: a stale `/interrupt` does not carry over.
        self.state.interrupt.store(false, Ordering::SeqCst);
        let client = item.client_id();
        self.state.session().client_id.clone_from(&client);
        let graph = item.graph.clone();
        let dirs = &self.state.dirs;
        let mut run = Run {
            item,
            catalog: self.state.catalog(),
            signatures: signatures(&graph, |class_type, inputs| {
                Builtin::from_name(class_type)
                    .map_or(ChangeToken::Stable, |node| node.change_token(inputs, dirs))
            }),
            graph,
            emitter: Emitter {
                hub: self.state.hub.clone(),
                client: client.clone(),
                messages: Vec::new(),
            },
            tracker: Arc::new(Tracker {
                hub: self.state.hub.clone(),
                client,
                prompt_id: item.prompt_id.clone(),
                interrupt: self.state.interrupt.clone(),
                nodes: Mutex::new(BTreeMap::new()),
            }),
            executed: Vec::new(),
        };
        run.emitter.lifecycle(
            "execution_start",
            json!({"prompt_id": item.prompt_id}),
            false,
        );
        cache.retain_for(run.signatures.values());
        let cached: Vec<&str> = run
            .graph
            .ids()
            .filter(|id| {
                run.signatures
                    .get(*id)
                    .is_some_and(|s| cache.get(s).is_some())
            })
            .collect();
        let cached = json!({"nodes": cached, "prompt_id": item.prompt_id});
        run.emitter.lifecycle("execution_cached", cached, false);

        let failure = self.run_nodes(&mut run, cache).await;
        let success = failure.is_none();
        match failure {
            None => run.emitter.lifecycle(
                "execution_success",
                json!({"prompt_id": item.prompt_id}),
                false,
            ),
            Some(failure) => report_failure(&mut run, failure),
        }

        let mut outputs = Map::new();
        let mut meta = Map::new();
        for id in run.graph.ids() {
            let entry = run.signatures.get(id).and_then(|s| cache.get(s));
            if let Some(ui) = entry.and_then(|e| e.ui.clone()) {
                outputs.insert(id.to_string(), ui);
                meta.insert(
                    id.to_string(),
                    json!({"node_id": id, "display_node": id, "parent_node": null, "real_node_id": id}),
                );
            }
        }
        self.state.session().last_node_id = None;
        RunOutcome {
            success,
            messages: run.emitter.messages,
            outputs,
            meta,
        }
    }

    /// The final `executing: null`, sent once history holds the prompt.
    pub fn finished(&self, item: &QueueItem) {
        if let Some(client) = item.client_id() {
            let data = json!({"node": null, "prompt_id": item.prompt_id});
            self.state.hub.send("executing", &data, Some(&client));
        }
    }

    async fn run_nodes(&self, run: &mut Run<'_>, cache: &mut OutputCache) -> Option<Failure> {
        let is_cached = |id: &str| {
            run.signatures
                .get(id)
                .is_some_and(|s| cache.get(s).is_some())
        };
        let mut plan = crate::plan::Plan::new(&run.graph, &run.item.outputs, is_cached);
        while !plan.is_empty() {
            let graph = run.graph.clone();
            let is_output = |id: &str| {
                graph
                    .class_type(id)
                    .is_some_and(|class| run.catalog.is_output_node(class))
            };
            let node_id = match plan.next(is_output) {
                Ok(id) => id,
                Err(blamed) => {
                    return Some(Failure::Error {
                        node_id: blamed,
                        exception_type: "graph.DependencyCycleError".into(),
                        exception_message: "Dependency cycle detected".into(),
                        traceback: Vec::new(),
                        current_inputs: json!([]),
                    });
                }
            };
            if let Err(failure) = self.run_node(run, cache, &node_id).await {
                return Some(failure);
            }
            plan.complete(&node_id);
        }
        None
    }

    async fn run_node(
        &self,
        run: &mut Run<'_>,
        cache: &mut OutputCache,
        node_id: &str,
    ) -> Result<(), Failure> {
        let prompt_id = run.item.prompt_id.clone();
        let signature = run.signatures.get(node_id).copied().unwrap_or_default();
        if let Some(entry) = cache.get(&signature) {
            // A reused output node: replay its UI output, run nothing.
            let output = entry.ui.clone().unwrap_or(Value::Null);
            let data = json!({"node": node_id, "display_node": node_id, "output": output, "prompt_id": prompt_id});
            run.emitter.to_client("executed", &data);
            run.tracker.finish(node_id);
            return Ok(());
        }
        let class_type = run
            .graph
            .class_type(node_id)
            .unwrap_or_default()
            .to_string();
        run.tracker.start(node_id);
        let inputs = gather_inputs(run, cache, node_id, &class_type);
        let data = json!({"node": node_id, "display_node": node_id, "prompt_id": prompt_id});
        run.emitter.to_client("executing", &data);
        self.state.session().last_node_id = Some(node_id.to_string());
        if self.state.interrupt.load(Ordering::SeqCst) {
            return Err(Failure::Interrupted {
                node_id: node_id.to_string(),
            });
        }
        let kind = match Builtin::from_name(&class_type) {
            Some(builtin) => NodeKind::Builtin(builtin),
            None => NodeKind::Extra(
                run.catalog
                    .info(&class_type)
                    .cloned()
                    .unwrap_or(Value::Null),
            ),
        };
        let ctx = NodeCtx {
            node_id: node_id.to_string(),
            env: self.env.clone(),
            prompt: run.graph.clone(),
            extra_pnginfo: run.item.extra_data.get("extra_pnginfo").cloned(),
            progress: run.tracker.clone(),
        };
        tracing::debug!(prompt_id = %prompt_id, node_id, class_type = %class_type, "running node");
        match nodes::run(&kind, &ctx, &inputs).await {
            Ok(output) => {
                if let Some(ui) = &output.ui {
                    let data = json!({"node": node_id, "display_node": node_id, "output": ui, "prompt_id": prompt_id});
                    run.emitter.to_client("executed", &data);
                }
                cache.insert(
                    signature,
                    CacheEntry {
                        outputs: Arc::new(output.values),
                        ui: output.ui,
                    },
                );
                run.tracker.finish(node_id);
                run.executed.push(node_id.to_string());
                Ok(())
            }
            Err(NodeError::Interrupted) => Err(Failure::Interrupted {
                node_id: node_id.to_string(),
            }),
            Err(NodeError::Exception {
                exception_type,
                message,
            }) => {
                tracing::info!(prompt_id = %prompt_id, node_id, %exception_type, %message, "node raised");
                let exception_message = if exception_type.contains("OutOfMemory") {
                    format!("{message}\n{OOM_TIPS}")
                } else {
                    format!("{message}\n")
                };
                Err(Failure::Error {
                    node_id: node_id.to_string(),
                    traceback: traceback(&class_type, &exception_type),
                    exception_type,
                    exception_message,
                    current_inputs: inputs.describe(),
                })
            }
        }
    }
}

fn report_failure(run: &mut Run<'_>, failure: Failure) {
    let node_type = |id: &str| run.graph.class_type(id).unwrap_or_default().to_string();
    match failure {
        Failure::Interrupted { node_id } => {
            let data = json!({
                "prompt_id": run.item.prompt_id,
                "node_id": node_id,
                "node_type": node_type(&node_id),
                "executed": run.executed,
            });
            run.emitter.lifecycle("execution_interrupted", data, true);
        }
        Failure::Error {
            node_id,
            exception_type,
            exception_message,
            traceback,
            current_inputs,
        } => {
            let data = json!({
                "prompt_id": run.item.prompt_id,
                "node_id": node_id,
                "node_type": node_type(&node_id),
                "executed": run.executed,
                "exception_message": exception_message,
                "exception_type": exception_type,
                "traceback": traceback,
                "current_inputs": current_inputs,
                "current_outputs": run.graph.ids().collect::<Vec<_>>(),
            });
            run.emitter.lifecycle("execution_error", data, false);
        }
    }
}

/// A Python-looking traceback (`traceback.format_tb`), so clients that show it have text.
fn traceback(class_type: &str, exception_type: &str) -> Vec<String> {
    vec![
        "  File \"/emp-comfyui-sim/execution.py\", line 1, in execute\n    output_data, output_ui, has_subgraph, has_pending_tasks = await get_output_data(prompt_id, unique_id, obj, input_data_all)\n".into(),
        format!("  File \"/emp-comfyui-sim/nodes.py\", line 1, in {class_type}\n    raise {exception_type}(message)\n"),
    ]
}

/// The node's inputs: upstream values for links (from the cache), literals for declared inputs.
fn gather_inputs(run: &Run<'_>, cache: &OutputCache, node_id: &str, class_type: &str) -> Inputs {
    let declared: Vec<String> = run
        .catalog
        .info(class_type)
        .map(|info| {
            ["required", "optional"]
                .iter()
                .filter_map(|category| info["input"].get(*category).and_then(Value::as_object))
                .flat_map(|section| section.keys().cloned())
                .collect()
        })
        .unwrap_or_default();
    let mut map = BTreeMap::new();
    for (name, value) in run.graph.inputs(node_id).into_iter().flatten() {
        if let Value::Array(_) = value {
            let Some((source, index)) = crate::graph::as_link(value) else {
                continue;
            };
            let index = index
                .as_u64()
                .or_else(|| index.as_f64().map(|x| x as u64))
                .unwrap_or(0) as usize;
            let upstream: Option<NodeValue> = run
                .signatures
                .get(source)
                .and_then(|s| cache.get(s))
                .and_then(|entry| entry.outputs.get(index).cloned());
            if let Some(upstream) = upstream {
                map.insert(name.clone(), Input::Linked(upstream));
            }
        } else if declared.contains(name) {
            map.insert(name.clone(), Input::Literal(value.clone()));
        }
    }
    Inputs::new(class_type, map)
}
