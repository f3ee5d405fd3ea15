//! The model's output, as text arrives, into content and tool-call pieces.
//!
//! One state machine per reply, fed the text of each batch of tokens ([`CallParser::push`])
//! and told when the generation ends ([`CallParser::finish`]). Streamed replies send its
//! events as they come; whole replies add them up; so the two always agree.
//!
//! - Content never carries call markup: text that may be the start of a marker
//!   (`<tool_cal`) is held back until the next text decides, as stop strings are.
//! - A call is announced ([`ParseEvent::CallStart`], its name) as soon as
//!   `{"name": "...", "arguments": ` (or `"parameters"`) has been read, and its arguments
//!   object follows in pieces as the model writes it ([`ParseEvent::Arguments`]); the pieces
//!   add up to the arguments' JSON text exactly as written.
//! - A call whose keys come in another order is read whole, then announced and sent in one
//!   piece.
//! - Markup that does not turn into a call (`<tool_call>` followed by something that is not
//!   a JSON object with a name and arguments) is given back as content, markup included: the
//!   client sees what the model wrote rather than losing it.
//! - A call cut short (`max_tokens`) keeps what was written: the arguments are incomplete and
//!   the finish reason says `length`, as OpenAI does.
//! - Whitespace around calls is not content: whitespace is held until text follows it and
//!   dropped when a call or the end comes first (after a call was made).
//! - With `parallel_tool_calls: false`, calls after the first are read and dropped.

use super::ToolFormat;

/// A piece of a parsed reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParseEvent {
    Content(String),
    /// A new call, numbered from 0 in the reply.
    CallStart {
        index: u32,
        name: String,
    },
    /// More of call `index`'s arguments JSON text.
    Arguments {
        index: u32,
        text: String,
    },
}

/// Where in the output the parser is.
#[derive(Debug, Clone, PartialEq)]
enum State {
    /// Content, watching for the family's opening marker (Hermes, Mistral).
    Text,
    /// Llama 3: before the first non-whitespace character, which decides call or content.
    LlamaStart,
    /// Content to the end (Llama 3 output that did not start with a call).
    Plain,
    /// Mistral: after `[TOOL_CALLS]`, before the list's `[`.
    MistralList,
    /// A call object's beginning, until its name and arguments key are read.
    CallHead,
    /// Inside a call's arguments object.
    Arguments(JsonScan),
    /// After the arguments, until the call object closes.
    CallTail(JsonScan),
    /// A call object in an unexpected shape, read whole before deciding (the buffer holds
    /// it from its `{`; the scan has seen its first `usize` bytes).
    Whole(JsonScan, usize),
    /// After a call: the family's separator or closing markup.
    AfterCall,
}

/// String-aware bracket counting over JSON text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct JsonScan {
    depth: u32,
    in_string: bool,
    escaped: bool,
}

impl JsonScan {
    /// Scans `text`; the byte offset just past the bracket that closes depth 0, if any.
    fn feed(&mut self, text: &str) -> Option<usize> {
        for (i, c) in text.char_indices() {
            if self.in_string {
                if self.escaped {
                    self.escaped = false;
                } else if c == '\\' {
                    self.escaped = true;
                } else if c == '"' {
                    self.in_string = false;
                }
                continue;
            }
            match c {
                '"' => self.in_string = true,
                '{' | '[' => self.depth += 1,
                '}' | ']' => {
                    self.depth = self.depth.saturating_sub(1);
                    if self.depth == 0 {
                        return Some(i + 1);
                    }
                }
                _ => {}
            }
        }
        None
    }
}

/// Result of reading a call's head: `{"name": "f", "arguments": `.
#[derive(Debug, PartialEq, Eq)]
enum Head {
    /// Not enough text yet.
    Need,
    /// Not this shape.
    Fail,
    /// The name, and the offset of the arguments object's `{`.
    Done { name: String, arguments_at: usize },
}

fn read_head(text: &str) -> Head {
    let mut cursor = Cursor { text, at: 0 };
    macro_rules! step {
        ($e:expr) => {
            match $e {
                Some(true) => {}
                Some(false) => return Head::Fail,
                None => return Head::Need,
            }
        };
    }
    cursor.skip_ws();
    step!(cursor.expect('{'));
    cursor.skip_ws();
    let key = match cursor.string() {
        Some(Ok(key)) => key,
        Some(Err(())) => return Head::Fail,
        None => return Head::Need,
    };
    if key != "name" {
        return Head::Fail;
    }
    cursor.skip_ws();
    step!(cursor.expect(':'));
    cursor.skip_ws();
    let name = match cursor.string() {
        Some(Ok(name)) => name,
        Some(Err(())) => return Head::Fail,
        None => return Head::Need,
    };
    cursor.skip_ws();
    step!(cursor.expect(','));
    cursor.skip_ws();
    let key = match cursor.string() {
        Some(Ok(key)) => key,
        Some(Err(())) => return Head::Fail,
        None => return Head::Need,
    };
    if key != "arguments" && key != "parameters" {
        return Head::Fail;
    }
    cursor.skip_ws();
    step!(cursor.expect(':'));
    cursor.skip_ws();
    match cursor.peek() {
        None => Head::Need,
        Some('{') => Head::Done {
            name,
            arguments_at: cursor.at,
        },
        Some(_) => Head::Fail,
    }
}

struct Cursor<'a> {
    text: &'a str,
    at: usize,
}

impl Cursor<'_> {
    fn peek(&self) -> Option<char> {
        self.text[self.at..].chars().next()
    }

    fn skip_ws(&mut self) {
        while let Some(c) = self.peek().filter(|c| c.is_whitespace()) {
            self.at += c.len_utf8();
        }
    }

    /// `Some(true)`: consumed `c`; `Some(false)`: another character; `None`: the end.
    fn expect(&mut self, c: char) -> Option<bool> {
        let next = self.peek()?;
        if next == c {
            self.at += c.len_utf8();
            Some(true)
        } else {
            Some(false)
        }
    }

    /// A JSON string literal, unescaped: `None` if it does not end yet.
    fn string(&mut self) -> Option<Result<String, ()>> {
        let rest = &self.text[self.at..];
        if !rest.starts_with('"') {
            return if rest.is_empty() { None } else { Some(Err(())) };
        }
        let mut escaped = false;
        for (i, c) in rest.char_indices().skip(1) {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                let literal = &rest[..=i];
                self.at += i + 1;
                return Some(serde_json::from_str(literal).map_err(|_| ()));
            }
        }
        None
    }
}

/// Parses one reply's output in a family's markup.
#[derive(Debug, Clone)]
pub struct CallParser {
    format: ToolFormat,
    /// Calls after this many are dropped (`parallel_tool_calls: false`: 1).
    max_calls: Option<u32>,
    state: State,
    /// Text received and not yet decided.
    buffer: String,
    /// The markup consumed since the current call began, given back as content if the call
    /// does not parse.
    markup: String,
    /// Whitespace held back (see the module doc).
    pending_ws: String,
    calls: u32,
    /// Markup given back as content because it did not parse.
    malformed: u32,
    events: Vec<ParseEvent>,
}

impl CallParser {
    pub fn new(format: ToolFormat, parallel: bool) -> Self {
        CallParser {
            format,
            max_calls: (!parallel).then_some(1),
            state: match format {
                ToolFormat::Llama3Json => State::LlamaStart,
                ToolFormat::Hermes | ToolFormat::Mistral => State::Text,
            },
            buffer: String::new(),
            markup: String::new(),
            pending_ws: String::new(),
            calls: 0,
            malformed: 0,
            events: Vec::new(),
        }
    }

    /// Calls announced so far (those dropped by `parallel_tool_calls: false` included).
    pub fn calls(&self) -> u32 {
        self.calls
    }

    /// Call markup that did not parse and was given back as content.
    pub fn malformed(&self) -> u32 {
        self.malformed
    }

    /// Feeds more output; the events it completes.
    pub fn push(&mut self, text: &str) -> Vec<ParseEvent> {
        self.buffer.push_str(text);
        while self.step(false) {}
        std::mem::take(&mut self.events)
    }

    /// The generation ended: what was held back is decided.
    pub fn finish(&mut self) -> Vec<ParseEvent> {
        while self.step(true) {}
        match std::mem::replace(&mut self.state, State::Plain) {
            // A call cut short keeps what it had.
            State::Arguments(_) | State::CallTail(_) | State::AfterCall => {}
            State::Text | State::LlamaStart | State::Plain | State::MistralList => {
                let rest = std::mem::take(&mut self.markup) + &std::mem::take(&mut self.buffer);
                self.content(&rest);
            }
            State::CallHead | State::Whole(..) => self.give_back(),
        }
        self.buffer.clear();
        if self.calls == 0 {
            let ws = std::mem::take(&mut self.pending_ws);
            if !ws.is_empty() {
                self.events.push(ParseEvent::Content(ws));
            }
        }
        std::mem::take(&mut self.events)
    }

    fn marker(&self) -> &'static str {
        match self.format {
            ToolFormat::Hermes => "<tool_call>",
            ToolFormat::Mistral => "[TOOL_CALLS]",
            ToolFormat::Llama3Json => "<|python_tag|>",
        }
    }

    /// The state once the output is content again after markup: Llama 3 output that is not
    /// a call is content to the end; the other families watch for their marker.
    fn content_state(&self) -> State {
        match self.format {
            ToolFormat::Llama3Json => State::Plain,
            ToolFormat::Hermes | ToolFormat::Mistral => State::Text,
        }
    }

    fn content(&mut self, text: &str) {
        if text.is_empty() {
            return;
        }
        if text.chars().all(char::is_whitespace) {
            self.pending_ws.push_str(text);
            return;
        }
        let trimmed = text.trim_end();
        let held = text[trimmed.len()..].to_string();
        let mut out = std::mem::take(&mut self.pending_ws);
        out.push_str(trimmed);
        self.pending_ws = held;
        match self.events.last_mut() {
            Some(ParseEvent::Content(last)) => last.push_str(&out),
            _ => self.events.push(ParseEvent::Content(out)),
        }
    }

    fn dropped(&self, index: u32) -> bool {
        self.max_calls.is_some_and(|max| index >= max)
    }

    fn start_call(&mut self, name: String) {
        let index = self.calls;
        self.calls += 1;
        self.pending_ws.clear();
        self.markup.clear();
        if !self.dropped(index) {
            self.events.push(ParseEvent::CallStart { index, name });
        }
    }

    fn arguments(&mut self, text: &str) {
        let index = self.calls - 1;
        if text.is_empty() || self.dropped(index) {
            return;
        }
        match self.events.last_mut() {
            Some(ParseEvent::Arguments { index: i, text: t }) if *i == index => t.push_str(text),
            _ => self.events.push(ParseEvent::Arguments {
                index,
                text: text.to_string(),
            }),
        }
    }

    /// The current call did not parse: its markup and text become content.
    fn give_back(&mut self) {
        self.malformed += 1;
        let raw = std::mem::take(&mut self.markup) + &std::mem::take(&mut self.buffer);
        self.content(&raw);
        self.state = self.content_state();
    }

    /// Moves `n` bytes of the buffer into the markup of the current call.
    fn consume_markup(&mut self, n: usize) {
        let taken: String = self.buffer.drain(..n).collect();
        self.markup.push_str(&taken);
    }

    /// Makes progress; false when it needs more text (or, at the end, can do no more).
    fn step(&mut self, at_end: bool) -> bool {
        match self.state.clone() {
            State::Plain => {
                let text = std::mem::take(&mut self.buffer);
                self.content(&text);
                false
            }
            State::Text => {
                let marker = self.marker();
                if let Some(at) = self.buffer.find(marker) {
                    let before: String = self.buffer.drain(..at).collect();
                    self.content(&before);
                    self.consume_markup(marker.len());
                    self.state = match self.format {
                        ToolFormat::Mistral => State::MistralList,
                        _ => State::CallHead,
                    };
                    return true;
                }
                // Hold back a tail that may be the marker's beginning.
                let keep = (1..marker.len())
                    .rev()
                    .find(|&n| {
                        self.buffer.len() >= n
                            && self.buffer.is_char_boundary(self.buffer.len() - n)
                            && marker.starts_with(&self.buffer[self.buffer.len() - n..])
                    })
                    .unwrap_or(0);
                let cut = self.buffer.len() - keep;
                let text: String = self.buffer.drain(..cut).collect();
                self.content(&text);
                false
            }
            State::LlamaStart => {
                let trimmed = self.buffer.trim_start();
                let ws = self.buffer.len() - trimmed.len();
                if trimmed.starts_with(self.marker()) {
                    self.consume_markup(ws + self.marker().len());
                    self.state = State::CallHead;
                    true
                } else if trimmed.starts_with('{') {
                    self.consume_markup(ws);
                    self.state = State::CallHead;
                    true
                } else if trimmed.is_empty() || (self.marker().starts_with(trimmed) && !at_end) {
                    false
                } else {
                    self.state = State::Plain;
                    true
                }
            }
            State::MistralList => {
                let trimmed = self.buffer.trim_start();
                let ws = self.buffer.len() - trimmed.len();
                match trimmed.chars().next() {
                    None => false,
                    Some('[') => {
                        self.consume_markup(ws + 1);
                        self.state = State::CallHead;
                        true
                    }
                    // Some Mistral outputs put a single object without the list.
                    Some('{') => {
                        self.state = State::CallHead;
                        true
                    }
                    Some(_) => {
                        self.give_back();
                        true
                    }
                }
            }
            State::CallHead => match read_head(&self.buffer) {
                Head::Need => false,
                Head::Done { name, arguments_at } => {
                    self.consume_markup(arguments_at);
                    self.start_call(name);
                    self.state = State::Arguments(JsonScan::default());
                    true
                }
                Head::Fail => {
                    if self.buffer.trim_start().starts_with('{') {
                        let ws = self.buffer.len() - self.buffer.trim_start().len();
                        self.consume_markup(ws);
                        self.state = State::Whole(JsonScan::default(), 0);
                    } else {
                        self.give_back();
                    }
                    true
                }
            },
            State::Arguments(mut scan) => {
                let text = std::mem::take(&mut self.buffer);
                match scan.feed(&text) {
                    Some(end) => {
                        self.arguments(&text[..end]);
                        self.buffer = text[end..].to_string();
                        self.state = State::CallTail(JsonScan {
                            depth: 1,
                            ..JsonScan::default()
                        });
                        true
                    }
                    None => {
                        self.arguments(&text);
                        self.state = State::Arguments(scan);
                        false
                    }
                }
            }
            State::CallTail(mut scan) => {
                let text = std::mem::take(&mut self.buffer);
                match scan.feed(&text) {
                    Some(end) => {
                        self.buffer = text[end..].to_string();
                        self.state = State::AfterCall;
                        true
                    }
                    None => {
                        self.state = State::CallTail(scan);
                        false
                    }
                }
            }
            State::Whole(mut scan, scanned) => {
                let text = self.buffer[scanned..].to_string();
                match scan.feed(&text) {
                    Some(end) => {
                        let object_len = scanned + end;
                        let object = self.buffer[..object_len].to_string();
                        match whole_call(&object) {
                            Some((name, arguments)) => {
                                self.buffer.drain(..object_len);
                                self.start_call(name);
                                self.arguments(&arguments);
                                self.state = State::AfterCall;
                            }
                            None => {
                                // Give back the object; what follows is parsed again.
                                let rest = self.buffer.split_off(object_len);
                                self.give_back();
                                self.buffer = rest;
                            }
                        }
                        true
                    }
                    None => {
                        self.state = State::Whole(scan, self.buffer.len());
                        false
                    }
                }
            }
            State::AfterCall => {
                let trimmed = self.buffer.trim_start();
                let ws = self.buffer.len() - trimmed.len();
                let (separator, closing): (&[&str], &[&str]) = match self.format {
                    ToolFormat::Hermes => (&[], &["</tool_call>"]),
                    ToolFormat::Llama3Json => (&[";"], &[]),
                    ToolFormat::Mistral => (&[","], &["]"]),
                };
                if trimmed.is_empty() {
                    return false;
                }
                if let Some(s) = separator.iter().find(|s| trimmed.starts_with(**s)) {
                    self.buffer.drain(..ws + s.len());
                    self.markup.clear();
                    // Llama 3 calls may each carry their own tag.
                    let rest = self.buffer.trim_start();
                    if self.format == ToolFormat::Llama3Json && rest.starts_with(self.marker()) {
                        let n = self.buffer.len() - rest.len() + self.marker().len();
                        self.buffer.drain(..n);
                    }
                    self.state = State::CallHead;
                    return true;
                }
                if let Some(c) = closing.iter().find(|c| trimmed.starts_with(**c)) {
                    self.buffer.drain(..ws + c.len());
                    self.state = self.content_state();
                    return true;
                }
                let could_be = separator
                    .iter()
                    .chain(closing)
                    .any(|m| m.starts_with(trimmed));
                if could_be {
                    if at_end {
                        // Cut off inside the closing markup (`max_tokens` ran out after the
                        // call): markup, not content.
                        self.buffer.clear();
                    }
                    return false;
                }
                // Something else after a call: content again.
                self.state = self.content_state();
                true
            }
        }
    }
}

/// `{"name": ..., "arguments" | "parameters": ...}` in any key order: the name and the
/// arguments as JSON text (a string value is taken as the JSON text itself).
fn whole_call(object: &str) -> Option<(String, String)> {
    let value: serde_json::Value = serde_json::from_str(object).ok()?;
    let object = value.as_object()?;
    let name = object.get("name")?.as_str()?.to_string();
    let arguments = object
        .get("arguments")
        .or_else(|| object.get("parameters"))?;
    let text = match arguments {
        serde_json::Value::String(text) => text.clone(),
        value @ serde_json::Value::Object(_) => serde_json::to_string(value).ok()?,
        _ => return None,
    };
    Some((name, text))
}

/// A whole reply's parse: its content (`None` if empty) and calls (name, arguments).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ParsedReply {
    pub content: Option<String>,
    pub calls: Vec<(String, String)>,
}

impl ParsedReply {
    /// Adds up events.
    pub fn add(&mut self, events: impl IntoIterator<Item = ParseEvent>) {
        for event in events {
            match event {
                ParseEvent::Content(text) => {
                    self.content.get_or_insert_with(String::new).push_str(&text)
                }
                ParseEvent::CallStart { name, .. } => self.calls.push((name, String::new())),
                ParseEvent::Arguments { index, text } => {
                    if let Some(call) = self.calls.get_mut(index as usize) {
                        call.1.push_str(&text);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses `output` whole, and again fed one character at a time: the two must agree.
    fn parse(format: ToolFormat, parallel: bool, output: &str) -> ParsedReply {
        let mut whole = ParsedReply::default();
        let mut parser = CallParser::new(format, parallel);
        whole.add(parser.push(output));
        whole.add(parser.finish());

        // Unless markup is given back whole (it did not parse), no content carries a part
        // of it.
        let given_back = whole
            .content
            .as_ref()
            .is_some_and(|c| format.markers().iter().any(|m| c.contains(m)));
        let mut streamed = ParsedReply::default();
        let mut parser = CallParser::new(format, parallel);
        for c in output.chars() {
            let events = parser.push(&c.to_string());
            for event in &events {
                if let ParseEvent::Content(text) = event
                    && !given_back
                {
                    for marker in format.markers() {
                        assert!(!text.contains(marker), "markup in content: {text:?}");
                    }
                }
            }
            streamed.add(events);
        }
        streamed.add(parser.finish());
        assert_eq!(
            whole, streamed,
            "whole and streamed parses differ for {output:?}"
        );
        whole
    }

    fn calls(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(n, a)| (n.to_string(), a.to_string()))
            .collect()
    }

    #[test]
    fn hermes_calls() {
        let output = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"tags\": [\"a}\", {\"b\": 1}]}}\n</tool_call>\n<tool_call>\n{\"name\": \"now\", \"arguments\": {}}\n</tool_call>";
        let parsed = parse(ToolFormat::Hermes, true, output);
        assert_eq!(parsed.content, None);
        assert_eq!(
            parsed.calls,
            calls(&[
                (
                    "get_weather",
                    r#"{"city": "Paris", "tags": ["a}", {"b": 1}]}"#
                ),
                ("now", "{}")
            ])
        );
        // Text before a call is content; parallel false keeps the first call.
        let parsed = parse(
            ToolFormat::Hermes,
            false,
            &format!("Let me check.\n{output}"),
        );
        assert_eq!(parsed.content.as_deref(), Some("Let me check."));
        assert_eq!(parsed.calls.len(), 1);
        // Keys in another order: read whole.
        let parsed = parse(
            ToolFormat::Hermes,
            true,
            "<tool_call>{\"arguments\": {\"x\": \"y\"}, \"name\": \"f\"}</tool_call>",
        );
        assert_eq!(parsed.calls, calls(&[("f", r#"{"x":"y"}"#)]));
    }

    #[test]
    fn hermes_without_calls_and_broken_markup() {
        let parsed = parse(
            ToolFormat::Hermes,
            true,
            "Paris is the capital. a < b <tool",
        );
        assert_eq!(
            parsed.content.as_deref(),
            Some("Paris is the capital. a < b <tool")
        );
        assert!(parsed.calls.is_empty());
        // Markup that is not a call comes back as content.
        let parsed = parse(
            ToolFormat::Hermes,
            true,
            "<tool_call>\nnot json</tool_call> ok",
        );
        assert_eq!(
            parsed.content.as_deref(),
            Some("<tool_call>\nnot json</tool_call> ok")
        );
        let parsed = parse(
            ToolFormat::Hermes,
            true,
            "<tool_call>{\"nam\": 1}</tool_call>",
        );
        assert_eq!(
            parsed.content.as_deref(),
            Some("<tool_call>{\"nam\": 1}</tool_call>")
        );
        // Cut short: the call keeps what it had.
        let parsed = parse(
            ToolFormat::Hermes,
            true,
            "<tool_call>\n{\"name\": \"f\", \"arguments\": {\"city\": \"Pa",
        );
        assert_eq!(parsed.calls, calls(&[("f", r#"{"city": "Pa"#)]));
        // Cut short before the name was read: the markup is given back.
        let parsed = parse(ToolFormat::Hermes, true, "<tool_call>\n{\"name\": \"f");
        assert_eq!(
            parsed.content.as_deref(),
            Some("<tool_call>\n{\"name\": \"f")
        );
        // Whitespace alone, with no call, is content.
        let parsed = parse(ToolFormat::Hermes, true, "  ");
        assert_eq!(parsed.content.as_deref(), Some("  "));
    }

    #[test]
    fn a_reply_cut_inside_the_closing_markup_leaks_none_of_it() {
        // `max_tokens` ran out in `</tool_call>`: the call stands, the markup goes.
        for cut in ["\n</tool_", "\n<", "</tool_call"] {
            let output =
                format!("<tool_call>\n{{\"name\": \"f\", \"arguments\": {{\"a\": 1}}}}{cut}");
            let parsed = parse(ToolFormat::Hermes, true, &output);
            assert_eq!(parsed.content, None, "{cut:?}");
            assert_eq!(parsed.calls, calls(&[("f", r#"{"a": 1}"#)]), "{cut:?}");
        }
        let parsed = parse(
            ToolFormat::Mistral,
            true,
            "[TOOL_CALLS] [{\"name\": \"a\", \"arguments\": {}}",
        );
        assert_eq!(parsed.content, None);
        assert_eq!(parsed.calls, calls(&[("a", "{}")]));
    }

    #[test]
    fn llama3_calls() {
        let parsed = parse(
            ToolFormat::Llama3Json,
            true,
            "{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Paris\"}}",
        );
        assert_eq!(parsed.content, None);
        assert_eq!(
            parsed.calls,
            calls(&[("get_weather", r#"{"city": "Paris"}"#)])
        );
        let parsed = parse(
            ToolFormat::Llama3Json,
            true,
            "<|python_tag|>{\"name\": \"a\", \"parameters\": {}}; {\"name\": \"b\", \"parameters\": {\"x\": 1}}",
        );
        assert_eq!(parsed.calls, calls(&[("a", "{}"), ("b", r#"{"x": 1}"#)]));
        // Text, or JSON that is not a call, is content.
        let parsed = parse(ToolFormat::Llama3Json, true, "The answer is {x}.");
        assert_eq!(parsed.content.as_deref(), Some("The answer is {x}."));
        let parsed = parse(ToolFormat::Llama3Json, true, " {\"city\": \"Paris\"}");
        assert_eq!(parsed.content.as_deref(), Some(" {\"city\": \"Paris\"}"));
        assert!(parsed.calls.is_empty());
    }

    #[test]
    fn mistral_calls() {
        let parsed = parse(
            ToolFormat::Mistral,
            true,
            "[TOOL_CALLS] [{\"name\": \"a\", \"arguments\": {\"q\": \"x]\"}}, {\"name\": \"b\", \"arguments\": {}}]",
        );
        assert_eq!(parsed.content, None);
        assert_eq!(parsed.calls, calls(&[("a", r#"{"q": "x]"}"#), ("b", "{}")]));
        let parsed = parse(ToolFormat::Mistral, true, "No tools needed: [1, 2].");
        assert_eq!(parsed.content.as_deref(), Some("No tools needed: [1, 2]."));
        let parsed = parse(ToolFormat::Mistral, true, "[TOOL_CALLS] oops");
        assert_eq!(parsed.content.as_deref(), Some("[TOOL_CALLS] oops"));
        let mut parser = CallParser::new(ToolFormat::Mistral, true);
        parser.push("[TOOL_CALLS] oops");
        parser.finish();
        assert_eq!(parser.malformed(), 1, "counted, for the log");
    }

    #[test]
    fn arguments_arrive_in_pieces() {
        let mut parser = CallParser::new(ToolFormat::Hermes, true);
        assert_eq!(parser.push("<tool_call>\n{\"name\": \"f\", "), vec![]);
        assert_eq!(
            parser.push("\"arguments\": {\"a\""),
            vec![
                ParseEvent::CallStart {
                    index: 0,
                    name: "f".into()
                },
                ParseEvent::Arguments {
                    index: 0,
                    text: "{\"a\"".into()
                }
            ]
        );
        assert_eq!(
            parser.push(": 1}}\n</tool_call>"),
            vec![ParseEvent::Arguments {
                index: 0,
                text: ": 1}".into()
            }]
        );
        assert_eq!(parser.finish(), vec![]);
        assert_eq!(parser.calls(), 1);
    }
}
