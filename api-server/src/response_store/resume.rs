//! The events of background responses that were streamed (`background` and `stream`), kept
//! so that a client who lost the stream resumes it (`GET /v1/responses/{id}?stream=true&
//! starting_after=N`) through any api-server: while the response runs, beside it
//! (with the background responses running here), and once it has ended, in the store with it.
//!
//! Events are numbered from 0 in the order they were made (their `sequence_number`), so the
//! events after `N` are those from position `N + 1`. Each is kept as its SSE text (an
//! `event:` and a `data:` line, then a blank line; the JSON holds no raw newline), so a stored
//! stream is their concatenation, split again at the blank lines.

use std::time::Duration;

use tandem_protocol::messages::{StoredResponseOp, StoredResponseReply, StoredResponseRequest};

use super::shared::{Home, PeerError, StoredResponses, odd_answer, question};

/// How long an api-server waits for more events of a running response before answering
/// with none (the asker asks again).
pub const EVENTS_WAIT: Duration = Duration::from_secs(1);

/// Events one answer carries at most (bytes of SSE text), well under NATS's default
/// `max_payload` (1 MiB); at least one event is always sent.
const MAX_EVENTS_BYTES: usize = 256 * 1024;

/// What a resuming client gets of a response's stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventsAfter {
    /// The response was not streamed in the background: it has no events to resume.
    NotStreamed,
    /// The events after the one asked for, in order (each one SSE event's text; none when
    /// none came yet), and whether they are the stream's last.
    Events { events: Vec<String>, done: bool },
}

/// The events of a stream from position `from`, at most about [`MAX_EVENTS_BYTES`], and
/// whether they reach its end (`ended`: no more will come).
fn page<'a>(all: impl Iterator<Item = &'a str>, from: usize, ended: bool) -> EventsAfter {
    let mut events = Vec::new();
    let mut bytes = 0;
    let mut rest = all.skip(from).peekable();
    while let Some(event) = rest.peek() {
        if !events.is_empty() && bytes + event.len() > MAX_EVENTS_BYTES {
            break;
        }
        bytes += event.len();
        events.push(rest.next().expect("peeked").to_string());
    }
    let done = ended && rest.peek().is_none();
    EventsAfter::Events { events, done }
}

/// Each event of a stream's SSE text.
fn split(text: &str) -> impl Iterator<Item = &str> {
    text.split_inclusive("\n\n")
}

/// The position after event `after` (events are numbered from 0).
fn position_after(after: Option<u64>) -> usize {
    after.map_or(0, |after| after as usize + 1)
}

impl StoredResponses {
    /// Background response `id` sent `sse` (one or more events' SSE text) to its stream:
    /// kept for clients resuming it, if it is streamed.
    pub fn record_events(&self, id: &str, sse: &str) {
        let mut running = self.lock_running();
        let Some(running) = running.get_mut(id) else {
            return;
        };
        if let Some(events) = &mut running.events {
            events.extend(split(sse).map(str::to_string));
            running.progress.send_replace(events.len());
        }
    }

    /// The events of `id`'s stream after event `after` as this api-server holds them, and
    /// while it runs a watch that changes when more come; `None` when `owner` has no
    /// response `id` here.
    fn events_here(
        &self,
        owner: Option<&str>,
        id: &str,
        after: Option<u64>,
    ) -> Option<(EventsAfter, Option<tokio::sync::watch::Receiver<usize>>)> {
        let from = position_after(after);
        let running = self.lock_running();
        if let Some(running) = Self::running_of(&running, owner, id) {
            return Some(match &running.events {
                None => (EventsAfter::NotStreamed, None),
                Some(events) => (
                    page(events.iter().map(String::as_str), from, false),
                    Some(running.progress.subscribe()),
                ),
            });
        }
        drop(running);
        Some(match self.local.events(owner, id)? {
            None => (EventsAfter::NotStreamed, None),
            Some(events) => (page(split(&events), from, true), None),
        })
    }

    /// [`Self::events_here`], waiting up to `wait` for more when there are none yet.
    async fn events_waiting(
        &self,
        owner: Option<&str>,
        id: &str,
        after: Option<u64>,
        wait: Duration,
    ) -> Option<EventsAfter> {
        let (found, progress) = self.events_here(owner, id, after)?;
        match (&found, progress) {
            (
                EventsAfter::Events {
                    events,
                    done: false,
                },
                Some(mut progress),
            ) if events.is_empty() => {
                // Ends early when more come, or when the response ends (its watch goes).
                let _ = tokio::time::timeout(wait, progress.changed()).await;
                self.events_here(owner, id, after).map(|(found, _)| found)
            }
            _ => Some(found),
        }
    }

    /// The events of `id`'s stream after event `after` (all of them when `None`), wherever
    /// it is kept, waiting up to about [`EVENTS_WAIT`] for more while it runs; `None` when
    /// `owner` has no response `id`.
    pub async fn events_after(
        &self,
        owner: Option<&str>,
        id: &str,
        after: Option<u64>,
    ) -> Result<Option<EventsAfter>, PeerError> {
        let instance = match self.home(id) {
            Home::Here => return Ok(self.events_waiting(owner, id, after, EVENTS_WAIT).await),
            Home::Nowhere => return Ok(None),
            Home::Peer(instance) => instance,
        };
        let question = StoredResponseRequest {
            after,
            ..question(owner, id, StoredResponseOp::Events)
        };
        match self.ask_about(instance, question).await? {
            None => Ok(None),
            Some(StoredResponseReply::NotStreamed) => Ok(Some(EventsAfter::NotStreamed)),
            Some(StoredResponseReply::Events { events, done }) => Ok(Some(EventsAfter::Events {
                events: split(&events).map(str::to_string).collect(),
                done,
            })),
            Some(other) => Err(odd_answer(instance, id, other)),
        }
    }

    /// The answer to another api-server asking for a stream's events.
    pub(super) async fn answer_events(
        &self,
        question: &StoredResponseRequest,
    ) -> StoredResponseReply {
        if !self.is_here(&question.id) {
            return StoredResponseReply::NotFound { missing: None };
        }
        let found = self
            .events_waiting(
                question.owner.as_deref(),
                &question.id,
                question.after,
                EVENTS_WAIT,
            )
            .await;
        match found {
            None => StoredResponseReply::NotFound { missing: None },
            Some(EventsAfter::NotStreamed) => StoredResponseReply::NotStreamed,
            Some(EventsAfter::Events { events, done }) => StoredResponseReply::Events {
                events: events.concat(),
                done,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::metrics::Metrics;
    use crate::response_store::ResponseStore;

    const OWNER: Option<&str> = Some("key:a");

    fn event(n: usize) -> String {
        format!("event: e\ndata: {{\"sequence_number\":{n}}}\n\n")
    }

    fn events(found: Option<EventsAfter>) -> (Vec<String>, bool) {
        match found {
            Some(EventsAfter::Events { events, done }) => (events, done),
            other => panic!("events, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_streamed_background_response_keeps_its_events_while_it_runs_and_after() {
        let store = StoredResponses::alone(ResponseStore::new(1 << 20), Metrics::new());
        let id = store.new_id();
        let queued = json!({"id": id, "status": "queued", "background": true}).to_string();
        store.start_background(OWNER.map(str::to_string), &id, None, &queued, vec![], true);
        // Two events in one chunk, then one.
        store.record_events(&id, &(event(0) + &event(1)));
        store.record_events(&id, &event(2));
        let (all, done) = events(store.events_after(OWNER, &id, None).await.unwrap());
        assert_eq!((all, done), (vec![event(0), event(1), event(2)], false));
        let (rest, _) = events(store.events_after(OWNER, &id, Some(1)).await.unwrap());
        assert_eq!(rest, [event(2)]);
        assert_eq!(
            store.events_after(Some("key:b"), &id, None).await.unwrap(),
            None
        );
        // Waiting for more: an event that comes meanwhile ends the wait.
        let waiting = store.events_after(OWNER, &id, Some(2));
        let sender = async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            store.record_events(&id, &event(3));
        };
        let started = std::time::Instant::now();
        let (found, ()) = tokio::join!(waiting, sender);
        assert_eq!(events(found.unwrap()), (vec![event(3)], false));
        assert!(started.elapsed() < EVENTS_WAIT, "{:?}", started.elapsed());
        // Nothing more: the wait ends after EVENTS_WAIT with none.
        let (none, done) = events(store.events_after(OWNER, &id, Some(3)).await.unwrap());
        assert!(none.is_empty() && !done);
        // Finished and stored: the same events, the last ones marked done.
        assert!(store.store_finished_background(
            OWNER.map(str::to_string),
            &id,
            None,
            queued,
            &[],
            &[]
        ));
        let (all, done) = events(store.events_after(OWNER, &id, None).await.unwrap());
        assert_eq!(all.len(), 4);
        assert!(done);
        let (past_the_end, done) = events(store.events_after(OWNER, &id, Some(9)).await.unwrap());
        assert!(past_the_end.is_empty() && done);
    }

    #[tokio::test]
    async fn a_response_not_streamed_in_the_background_has_no_events() {
        let store = StoredResponses::alone(ResponseStore::new(1 << 20), Metrics::new());
        let id = store.new_id();
        store.put(None, &id, None, "{}".into(), &[], &[]);
        assert_eq!(
            store.events_after(None, &id, None).await.unwrap(),
            Some(EventsAfter::NotStreamed)
        );
        let running = store.new_id();
        store.start_background(None, &running, None, "{}", vec![], false);
        assert_eq!(
            store.events_after(None, &running, None).await.unwrap(),
            Some(EventsAfter::NotStreamed)
        );
        // A question from another api-server gets the same answers.
        let reply = store
            .answer_events(&question(None, &id, StoredResponseOp::Events))
            .await;
        assert_eq!(reply, StoredResponseReply::NotStreamed);
    }

    #[test]
    fn a_page_is_bounded_but_never_empty() {
        let big = "x".repeat(MAX_EVENTS_BYTES);
        let all = [big.as_str(), big.as_str(), "small"];
        let EventsAfter::Events { events, done } = page(all.iter().copied(), 0, true) else {
            panic!("events");
        };
        assert_eq!((events.len(), done), (1, false));
        let EventsAfter::Events { events, done } = page(all.iter().copied(), 1, true) else {
            panic!("events");
        };
        assert_eq!((events.len(), done), (1, false));
        let EventsAfter::Events { events, done } = page(all.iter().copied(), 2, true) else {
            panic!("events");
        };
        assert_eq!((events, done), (vec!["small".to_string()], true));
    }
}
