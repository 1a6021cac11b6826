//! The order nodes run in: ComfyUI's `ExecutionList`.
//!
//! Starting from the output nodes, it pulls in every upstream node that is not cached, then
//! repeatedly picks a node whose inputs are ready, preferring output nodes and the nodes that
//! feed them (ComfyUI's `ux_friendly_pick_node`), so results appear as early as they can.

use std::collections::HashMap;

use crate::graph::{Graph, as_link};

#[derive(Debug, Default)]
pub struct Plan {
    /// Nodes still to run, in the order they were added.
    pending: Vec<String>,
    /// How many pending nodes each node still waits for.
    block_count: HashMap<String, usize>,
    /// Node → the nodes waiting for it.
    blocking: HashMap<String, Vec<String>>,
}

impl Plan {
    pub fn new(graph: &Graph, outputs: &[String], is_cached: impl Fn(&str) -> bool) -> Plan {
        let mut plan = Plan::default();
        for output in outputs {
            plan.add_node(graph, output, &is_cached);
        }
        plan
    }

    fn add_node(&mut self, graph: &Graph, start: &str, is_cached: &impl Fn(&str) -> bool) {
        let mut stack = vec![start.to_string()];
        let mut links = Vec::new();
        while let Some(id) = stack.pop() {
            if self.pending.contains(&id) || !graph.contains(&id) {
                continue;
            }
            self.pending.push(id.clone());
            self.block_count.insert(id.clone(), 0);
            self.blocking.entry(id.clone()).or_default();
            for value in graph
                .inputs(&id)
                .into_iter()
                .flat_map(|inputs| inputs.values())
            {
                if let Some((source, _)) = as_link(value) {
                    if !is_cached(source) {
                        stack.push(source.to_string());
                    }
                    links.push((source.to_string(), id.clone()));
                }
            }
        }
        for (from, to) in links {
            if is_cached(&from) || !graph.contains(&from) {
                continue;
            }
            self.add_node(graph, &from, is_cached);
            let waiting = self.blocking.entry(from).or_default();
            if !waiting.contains(&to) {
                waiting.push(to.clone());
                *self.block_count.entry(to).or_default() += 1;
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// The next node to run; `Err` names the node to blame when only a cycle is left.
    pub fn next(&self, is_output: impl Fn(&str) -> bool) -> Result<String, String> {
        let ready: Vec<&String> = self
            .pending
            .iter()
            .filter(|id| self.block_count.get(*id).copied().unwrap_or(0) == 0)
            .collect();
        if ready.is_empty() {
            return Err(self.nodes_in_cycle().into_iter().next().unwrap_or_default());
        }
        let feeds = |id: &str, depth: usize| -> bool {
            let mut frontier = vec![id.to_string()];
            for _ in 0..depth {
                frontier = frontier
                    .iter()
                    .flat_map(|n| self.blocking.get(n).cloned().unwrap_or_default())
                    .collect();
            }
            frontier.iter().any(|n| is_output(n))
        };
        for depth in 0..=2 {
            if let Some(id) = ready.iter().find(|id| feeds(id, depth)) {
                return Ok((*id).clone());
            }
        }
        Ok(ready[0].clone())
    }

    pub fn complete(&mut self, id: &str) {
        self.pending.retain(|pending| pending != id);
        for waiting in self.blocking.remove(id).unwrap_or_default() {
            if let Some(count) = self.block_count.get_mut(&waiting) {
                *count = count.saturating_sub(1);
            }
        }
    }

    /// What is left after peeling off every node that waits for nothing: the cycle (and what
    /// hangs below it), in pending order.
    fn nodes_in_cycle(&self) -> Vec<String> {
        let mut blocked_by: HashMap<&str, Vec<&str>> = self
            .pending
            .iter()
            .map(|id| (id.as_str(), Vec::new()))
            .collect();
        for (from, targets) in &self.blocking {
            for to in targets {
                if let Some(list) = blocked_by.get_mut(to.as_str()) {
                    list.push(from.as_str());
                }
            }
        }
        loop {
            let free: Vec<&str> = blocked_by
                .iter()
                .filter(|(_, b)| b.is_empty())
                .map(|(id, _)| *id)
                .collect();
            if free.is_empty() {
                break;
            }
            for id in &free {
                blocked_by.remove(id);
            }
            for list in blocked_by.values_mut() {
                list.retain(|from| !free.contains(from));
            }
        }
        self.pending
            .iter()
            .filter(|id| blocked_by.contains_key(id.as_str()))
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    fn graph(value: Value) -> Graph {
        serde_json::from_value(value).unwrap()
    }

    fn run_order(plan: &mut Plan, outputs: &[&str]) -> Vec<String> {
        let mut order = Vec::new();
        while !plan.is_empty() {
            let id = plan.next(|id| outputs.contains(&id)).unwrap();
            plan.complete(&id);
            order.push(id);
        }
        order
    }

    #[test]
    fn runs_a_chain_in_order_and_skips_cached_upstream() {
        let g = graph(json!({
            "1": {"inputs": {}},
            "2": {"inputs": {"image": ["1", 0]}},
            "3": {"inputs": {"images": ["2", 0]}},
        }));
        let mut plan = Plan::new(&g, &["3".into()], |_| false);
        assert_eq!(run_order(&mut plan, &["3"]), ["1", "2", "3"]);
        let mut plan = Plan::new(&g, &["3".into()], |id| id == "2");
        assert_eq!(run_order(&mut plan, &["3"]), ["3"]);
    }

    #[test]
    fn a_cycle_is_reported() {
        let g = graph(json!({
            "1": {"inputs": {"a": ["2", 0]}},
            "2": {"inputs": {"a": ["1", 0]}},
        }));
        let plan = Plan::new(&g, &["2".into()], |_| false);
        assert!(plan.next(|_| false).is_err());
    }
}
