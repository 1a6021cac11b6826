//! Finished prompts, in completion order, as `/history` serves them.
//!
//! Like ComfyUI's dict: a reused prompt id overwrites its entry in place, and past 10 000
//! entries the oldest goes.

use std::collections::{BTreeMap, HashMap};

use serde_json::{Map, Value};

const MAXIMUM_HISTORY_SIZE: usize = 10_000;

#[derive(Debug, Default)]
pub struct History {
    entries: BTreeMap<u64, (String, Value)>,
    positions: HashMap<String, u64>,
    next_position: u64,
}

impl History {
    pub fn insert(&mut self, prompt_id: &str, entry: Value) {
        if let Some(position) = self.positions.get(prompt_id) {
            self.entries
                .insert(*position, (prompt_id.to_string(), entry));
            return;
        }
        if self.entries.len() > MAXIMUM_HISTORY_SIZE {
            if let Some((_, (oldest, _))) = self.entries.pop_first() {
                self.positions.remove(&oldest);
            }
        }
        self.entries
            .insert(self.next_position, (prompt_id.to_string(), entry));
        self.positions
            .insert(prompt_id.to_string(), self.next_position);
        self.next_position += 1;
    }

    /// `{prompt_id: entry}`, or `{}` when unknown.
    pub fn one(&self, prompt_id: &str) -> Value {
        let mut out = Map::new();
        if let Some((id, entry)) = self
            .positions
            .get(prompt_id)
            .and_then(|p| self.entries.get(p))
        {
            out.insert(id.clone(), entry.clone());
        }
        Value::Object(out)
    }

    /// ComfyUI's `get_history(max_items, offset)`: without an offset, the last `max_items`.
    pub fn many(&self, max_items: Option<usize>, offset: Option<i64>) -> Value {
        let mut offset = offset.unwrap_or(-1);
        if offset < 0 {
            if let Some(max) = max_items {
                offset = self.entries.len() as i64 - max as i64;
            }
        }
        let mut out = Map::new();
        for (i, (id, entry)) in self.entries.values().enumerate() {
            if i as i64 >= offset {
                out.insert(id.clone(), entry.clone());
                if max_items.is_some_and(|max| out.len() >= max) {
                    break;
                }
            }
        }
        Value::Object(out)
    }

    pub fn delete(&mut self, prompt_id: &str) {
        if let Some(position) = self.positions.remove(prompt_id) {
            self.entries.remove(&position);
        }
    }

    pub fn clear(&mut self) {
        self.entries.clear();
        self.positions.clear();
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn overwrites_in_place_and_pages_from_the_end() {
        let mut history = History::default();
        for id in ["a", "b", "c"] {
            history.insert(id, json!({"v": id}));
        }
        history.insert("a", json!({"v": "a2"}));
        assert_eq!(history.one("a"), json!({"a": {"v": "a2"}}));
        assert_eq!(history.one("zz"), json!({}));
        let last_two = history.many(Some(2), None);
        assert_eq!(
            last_two.as_object().unwrap().keys().collect::<Vec<_>>(),
            ["b", "c"]
        );
        history.delete("b");
        assert_eq!(history.many(None, None).as_object().unwrap().len(), 2);
    }
}
