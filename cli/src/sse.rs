//! Server-Sent Events, as `GET /api/v1/jobs/{id}/events` writes them: `event: <name>` and
//! `data: <json>` lines, an empty line ending each event, and `:` comment lines as keep-alives.
//!
//! [`SseParser`] is fed the body's chunks as they come (a line may be split across chunks)
//! and hands back the complete events.

/// One event: its name (`message` when the server gave none) and its data lines joined by
/// `\n`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// The `event:` field.
    pub name: String,
    /// The `data:` fields.
    pub data: String,
}

/// An incremental parser.
#[derive(Debug, Default)]
pub struct SseParser {
    /// Bytes of a line not ended yet.
    partial: Vec<u8>,
    /// The previous chunk ended on `\r`, so a leading `\n` belongs to that line end.
    after_cr: bool,
    name: Option<String>,
    data: Option<String>,
}

impl SseParser {
    /// A parser at the start of a stream.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds the next chunk; returns the events it completed.
    pub fn feed(&mut self, chunk: &[u8]) -> Vec<SseEvent> {
        let mut events = Vec::new();
        for &byte in chunk {
            let after_cr = std::mem::replace(&mut self.after_cr, false);
            match byte {
                b'\n' if after_cr => {}
                b'\n' | b'\r' => {
                    self.after_cr = byte == b'\r';
                    let line = std::mem::take(&mut self.partial);
                    if let Some(event) = self.line(&String::from_utf8_lossy(&line)) {
                        events.push(event);
                    }
                }
                _ => self.partial.push(byte),
            }
        }
        events
    }

    /// Handles one complete line.
    fn line(&mut self, line: &str) -> Option<SseEvent> {
        if line.is_empty() {
            let data = self.data.take();
            let name = self.name.take();
            return data.map(|data| SseEvent {
                name: name.unwrap_or_else(|| "message".into()),
                data,
            });
        }
        if line.starts_with(':') {
            return None;
        }
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "event" => self.name = Some(value.to_owned()),
            "data" => match &mut self.data {
                Some(data) => {
                    data.push('\n');
                    data.push_str(value);
                }
                None => self.data = Some(value.to_owned()),
            },
            // `id` and `retry` matter for browsers reconnecting; a reconnect here asks again
            // and gets the current state first, so they are not needed.
            _ => {}
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(name: &str, data: &str) -> SseEvent {
        SseEvent {
            name: name.into(),
            data: data.into(),
        }
    }

    #[test]
    fn events_split_anywhere_are_put_back_together() {
        let stream = b"event: status\ndata: {\"a\":1}\n\n: keep-alive\n\nevent: done\r\ndata: x\r\ndata: y\r\n\r\n";
        for split in 0..stream.len() {
            let mut parser = SseParser::new();
            let mut events = parser.feed(&stream[..split]);
            events.extend(parser.feed(&stream[split..]));
            assert_eq!(
                events,
                vec![event("status", "{\"a\":1}"), event("done", "x\ny")],
                "split at {split}"
            );
        }
    }

    #[test]
    fn an_event_without_data_is_not_dispatched_and_a_nameless_one_is_a_message() {
        let mut parser = SseParser::new();
        let events = parser.feed(b"event: lonely\n\ndata:plain\n\n");
        assert_eq!(events, vec![event("message", "plain")]);
    }

    #[test]
    fn an_unfinished_event_waits_for_its_blank_line() {
        let mut parser = SseParser::new();
        assert!(parser.feed(b"event: progress\ndata: 1\n").is_empty());
        assert_eq!(parser.feed(b"\n"), vec![event("progress", "1")]);
    }
}
