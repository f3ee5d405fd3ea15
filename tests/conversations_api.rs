//! The Conversations API (`/v1/conversations`) against a live deployment: two api-servers
//! and a `worker --role both` on SmolLM2, as real processes with nats-server. A conversation
//! made through one api-server is read, changed and continued through either; a response
//! naming it starts from its items (the text chat completions give for the same turns) and
//! adds its own before the client sees it finished, streamed, whole or in the background;
//! another key finds nothing; the api-server holding it stops and the other says so. Then the
//! official `openai` client and the Agents SDK's `OpenAIConversationsSession`
//! (tests/python/conversations.py).
//!
//! The Python part needs `openai` and `openai-agents` importable: scripts/test installs them
//! into `target/pylib` and points `TANDEM_TEST_PYTHONPATH` there.

mod support;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::SERVED_NAME;
use tandem_test_kit::{ApiServer, Http, Nats, model_dir, prometheus};

const MODEL: &str = "smollm2-bf16";

fn ok(reply: tandem_test_kit::Response, what: &str) -> Value {
    assert_eq!(reply.status, 200, "{what}: {}", reply.body);
    reply.json()
}

/// The 400's `param`, and its message.
fn refused(reply: tandem_test_kit::Response) -> (String, String) {
    assert_eq!(reply.status, 400, "{}", reply.body);
    let error = &reply.json()["error"];
    (
        error["param"].as_str().unwrap_or_default().to_string(),
        error["message"].as_str().unwrap().to_string(),
    )
}

/// The one message's text of a response.
fn output_text(response: &Value) -> String {
    let output = response["output"].as_array().unwrap();
    assert_eq!(output.len(), 1, "{response}");
    output[0]["content"][0]["text"]
        .as_str()
        .unwrap()
        .to_string()
}

fn chat_text(http: &Http, messages: Value, max_tokens: u32) -> String {
    let reply = ok(
        http.post(
            "/v1/chat/completions",
            &json!({"messages": messages, "max_tokens": max_tokens, "temperature": 0}),
        ),
        "chat",
    );
    reply["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Every item of conversation `id`, oldest first.
fn items(http: &Http, id: &str) -> Vec<Value> {
    let list = ok(
        http.get(&format!("/v1/conversations/{id}/items?order=asc&limit=100")),
        "items",
    );
    assert_eq!(list["object"], "list");
    assert_eq!(list["has_more"], false);
    list["data"].as_array().unwrap().clone()
}

/// Each item as (role, text) for messages.
fn said(items: &[Value]) -> Vec<(String, String)> {
    items
        .iter()
        .map(|item| {
            assert_eq!(item["type"], "message", "{item}");
            // An answer cut by its token limit is listed as it was returned, incomplete.
            assert!(
                item["status"] == "completed" || item["status"] == "incomplete",
                "{item}"
            );
            assert!(item["id"].as_str().is_some_and(|id| !id.is_empty()));
            (
                item["role"].as_str().unwrap().to_string(),
                item["content"][0]["text"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn turn(role: &str, text: &str) -> (String, String) {
    (role.to_string(), text.to_string())
}

/// The chat messages of `turns`.
fn messages(turns: &[(String, String)]) -> Value {
    Value::Array(
        turns
            .iter()
            .map(|(role, text)| json!({"role": role, "content": text}))
            .collect(),
    )
}

#[test]
fn conversations_are_kept_and_continued_through_any_api_server() {
    let nats = Nats::start();
    let model = model_dir(MODEL);
    let flags = [
        "--worker-timeout-ms",
        "1500",
        "--api-key",
        "sk-conv-a",
        "--api-key",
        "sk-conv-b",
    ];
    let mut api_one = ApiServer::start(&nats, &model, SERVED_NAME, &flags);
    let api_two = ApiServer::start(&nats, &model, SERVED_NAME, &flags);
    let _worker = support::start_worker(&nats, &model, "w0", &[]);
    api_one.http.wait_for_workers(1, Duration::from_secs(30));
    api_two.http.wait_for_workers(1, Duration::from_secs(30));
    let one = &api_one.http.clone().with_bearer("sk-conv-a");
    let two = &api_two.http.clone().with_bearer("sk-conv-a");
    let other_key = &api_two.http.clone().with_bearer("sk-conv-b");

    // Made through the first api-server with two items and metadata.
    let created = ok(
        one.post(
            "/v1/conversations",
            &json!({"metadata": {"topic": "names"}, "items": [
                {"role": "user", "content": "My name is Ada."},
                {"type": "message", "role": "assistant", "content": "Hello Ada."},
            ]}),
        ),
        "create",
    );
    let id = created["id"].as_str().unwrap().to_string();
    let digits = id.strip_prefix("conv_").unwrap();
    assert!(
        digits.len() == 48 && digits.bytes().all(|b| b.is_ascii_hexdigit()),
        "{id}"
    );
    assert_eq!(created["object"], "conversation");
    assert_eq!(created["metadata"], json!({"topic": "names"}));
    assert!(created["created_at"].as_u64().unwrap() > 0);
    // Read through the other api-server as made; not with another key.
    let path = format!("/v1/conversations/{id}");
    assert_eq!(ok(two.get(&path), "get"), created);
    let hidden = other_key.get(&path);
    assert_eq!(hidden.status, 404, "{}", hidden.body);
    assert_eq!(hidden.json()["error"]["code"], "conversation_not_found");
    let mut history = vec![
        turn("user", "My name is Ada."),
        turn("assistant", "Hello Ada."),
    ];
    let listed = items(two, &id);
    assert_eq!(said(&listed), history);
    assert_eq!(listed[0]["content"][0]["type"], "input_text");
    assert_eq!(listed[1]["content"][0]["type"], "output_text");

    // A response through the second api-server starts from the conversation's items, and
    // adds its own: the question, then its answer (the output item as returned).
    let question = "What is my name?";
    let response = ok(
        two.post(
            "/v1/responses",
            &json!({"conversation": id, "input": question, "max_output_tokens": 12,
                    "temperature": 0}),
        ),
        "response",
    );
    assert_eq!(response["conversation"], json!({"id": id}));
    history.push(turn("user", question));
    assert_eq!(
        output_text(&response),
        chat_text(one, messages(&history), 12)
    );
    history.push(turn("assistant", &output_text(&response)));
    let listed = items(one, &id);
    assert_eq!(said(&listed), history);
    assert_eq!(listed[3]["id"], response["output"][0]["id"]);

    // Streamed through the first api-server (the conversation named as an object): the
    // items are there, through the other api-server, as soon as the stream has ended.
    let question = "Spell my name backwards.";
    let stream = one.post(
        "/v1/responses",
        &json!({"conversation": {"id": id}, "input": question, "max_output_tokens": 10,
                "temperature": 0, "stream": true}),
    );
    assert_eq!(stream.status, 200, "{}", stream.body);
    let last: Value = stream
        .body
        .lines()
        .filter_map(|line| line.strip_prefix("data: "))
        .map(|data| serde_json::from_str::<Value>(data).unwrap())
        .next_back()
        .unwrap();
    let streamed = &last["response"];
    assert_eq!(streamed["conversation"]["id"], id.as_str(), "{last}");
    history.push(turn("user", question));
    assert_eq!(
        output_text(streamed),
        chat_text(two, messages(&history), 10)
    );
    history.push(turn("assistant", &output_text(streamed)));
    assert_eq!(said(&items(two, &id)), history);

    // In the background through the first, polled through the second: added when done.
    let queued = ok(
        one.post(
            "/v1/responses",
            &json!({"conversation": id, "input": "Thank you.", "max_output_tokens": 6,
                    "temperature": 0, "background": true}),
        ),
        "background",
    );
    let background_id = queued["id"].as_str().unwrap().to_string();
    let started = Instant::now();
    let finished = loop {
        let object = ok(two.get(&format!("/v1/responses/{background_id}")), "poll");
        if ["completed", "incomplete"].contains(&object["status"].as_str().unwrap()) {
            break object;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "{object}");
        std::thread::sleep(Duration::from_millis(50));
    };
    history.push(turn("user", "Thank you."));
    history.push(turn("assistant", &output_text(&finished)));
    let listed = items(two, &id);
    assert_eq!(said(&listed), history);

    // Paging, newest first by default.
    let page = ok(
        two.get(&format!("/v1/conversations/{id}/items?limit=3")),
        "page",
    );
    let newest: Vec<&Value> = listed.iter().rev().take(3).collect();
    assert_eq!(
        page["data"].as_array().unwrap().iter().collect::<Vec<_>>(),
        newest
    );
    assert_eq!(page["has_more"], true);
    let after = page["last_id"].as_str().unwrap();
    let rest = ok(
        one.get(&format!(
            "/v1/conversations/{id}/items?after={after}&limit=100"
        )),
        "rest",
    );
    assert_eq!(rest["data"].as_array().unwrap().len(), listed.len() - 3);

    // One item read and deleted through either; metadata replaced through either.
    let first_item = listed[0]["id"].as_str().unwrap();
    let item_path = format!("/v1/conversations/{id}/items/{first_item}");
    assert_eq!(ok(two.get(&item_path), "item"), listed[0]);
    let after_delete = ok(one.delete(&item_path), "delete item");
    assert_eq!(after_delete["id"], id.as_str());
    assert_eq!(after_delete["object"], "conversation");
    assert_eq!(items(two, &id).len(), listed.len() - 1);
    let gone_item = two.get(&item_path);
    assert_eq!(gone_item.status, 404, "{}", gone_item.body);
    assert_eq!(gone_item.json()["error"]["code"], "item_not_found");
    let updated = ok(
        two.post(&path, &json!({"metadata": {"topic": "spelling"}})),
        "update",
    );
    assert_eq!(updated["metadata"], json!({"topic": "spelling"}));
    assert_eq!(ok(one.get(&path), "get")["metadata"], updated["metadata"]);
    // Items added by hand, through the other api-server.
    let added = ok(
        two.post(
            &format!("{path}/items"),
            &json!({"items": [{"role": "user", "content": "One more thing."}]}),
        ),
        "add",
    );
    assert_eq!(added["object"], "list");
    assert_eq!(added["data"][0]["content"][0]["text"], "One more thing.");
    assert_eq!(
        items(one, &id).last().unwrap()["id"],
        added["data"][0]["id"]
    );

    // Refusals, each naming its field.
    let request = |body: Value| refused(one.post("/v1/responses", &body));
    let earlier = response["id"].as_str().unwrap();
    assert_eq!(
        request(json!({"conversation": id, "previous_response_id": earlier, "input": "x"})).0,
        "conversation"
    );
    assert_eq!(
        request(json!({"conversation": 7, "input": "x"})).0,
        "conversation"
    );
    let (param, message) = request(json!({"conversation": "conv_nope", "input": "x"}));
    assert_eq!(param, "conversation", "{message}");
    let too_many: Vec<Value> = (0..21)
        .map(|_| json!({"role": "user", "content": "x"}))
        .collect();
    assert_eq!(
        refused(one.post("/v1/conversations", &json!({"items": too_many}))).0,
        "items"
    );
    assert_eq!(
        refused(one.post(
            "/v1/conversations",
            &json!({"items": [{"role": "robot", "content": "x"}]})
        ))
        .0,
        "items[0].role"
    );
    assert_eq!(
        refused(one.post("/v1/conversations", &json!({"title": "x"}))).0,
        "title"
    );
    assert_eq!(
        refused(one.post("/v1/conversations", &json!({"metadata": {"k": 1}}))).0,
        "metadata.k"
    );
    assert_eq!(
        refused(two.get(&format!(
            "{path}/items?include=message.output_text.logprobs"
        )))
        .0,
        "include"
    );
    assert_eq!(
        refused(two.get(&format!("{path}/items?limit=0"))).0,
        "limit"
    );
    assert_eq!(
        refused(two.post(&format!("{path}/items"), &json!({}))).0,
        "items"
    );

    let metrics = api_one.http.get("/metrics").body;
    assert_eq!(
        prometheus::metric(&metrics, "tandem_response_store_conversations", ""),
        Some(1.0),
        "{metrics}"
    );

    // A conversation deleted while a response naming it runs takes nothing: the response
    // stands, and the api-server running it counts the lost turn.
    let doomed = ok(one.post("/v1/conversations", &json!({})), "create");
    let doomed_id = doomed["id"].as_str().unwrap();
    let running = ok(
        one.post(
            "/v1/responses",
            &json!({"conversation": doomed_id, "input": "List numbers.",
                    "max_output_tokens": 400, "temperature": 0, "background": true,
                    "text": {"format": {"type": "json_schema", "name": "numbers", "schema": {
                        "type": "object", "properties": {"n": {"type": "array",
                        "items": {"type": "integer"}, "minItems": 40}}, "required": ["n"]}}}}),
        ),
        "background",
    );
    ok(
        two.delete(&format!("/v1/conversations/{doomed_id}")),
        "delete",
    );
    let running_id = running["id"].as_str().unwrap();
    let started = Instant::now();
    let finished = loop {
        let object = ok(two.get(&format!("/v1/responses/{running_id}")), "poll");
        if ["completed", "incomplete"].contains(&object["status"].as_str().unwrap()) {
            break object;
        }
        assert!(started.elapsed() < Duration::from_secs(120), "{object}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(finished["conversation"]["id"], doomed_id, "{finished}");
    let metrics = api_one.http.get("/metrics").body;
    assert_eq!(
        prometheus::metric(&metrics, "tandem_conversation_turns_lost_total", ""),
        Some(1.0),
        "{metrics}"
    );

    // Deleted through the second api-server: gone everywhere, and a response naming it is
    // refused.
    let deleted = ok(two.delete(&path), "delete");
    assert_eq!(
        deleted,
        json!({"id": id, "object": "conversation.deleted", "deleted": true})
    );
    assert_eq!(one.get(&path).status, 404);
    assert_eq!(
        request(json!({"conversation": id, "input": "x"})).0,
        "conversation"
    );

    // The api-server holding a conversation stops: the other says it is gone with it.
    let kept = ok(one.post("/v1/conversations", &json!({})), "create");
    let kept_path = format!("/v1/conversations/{}", kept["id"].as_str().unwrap());
    assert_eq!(ok(two.get(&kept_path), "get"), kept);
    api_one.proc.kill();
    let started = Instant::now();
    let gone = loop {
        let reply = two.get(&kept_path);
        if reply.status == 404 || started.elapsed() > Duration::from_secs(10) {
            break reply;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(gone.status, 404, "{}", gone.body);
    let error = &gone.json()["error"];
    assert_eq!(error["code"], "conversation_not_found");
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("no longer answers"),
        "{error}"
    );
    let (param, message) = refused(two.post(
        "/v1/responses",
        &json!({"conversation": kept["id"], "input": "x"}),
    ));
    assert_eq!(param, "conversation", "{message}");
    // The survivor still makes and serves conversations.
    let fresh = ok(two.post("/v1/conversations", &json!({})), "create");
    let fresh_id = fresh["id"].as_str().unwrap();
    let served = ok(
        two.post(
            "/v1/responses",
            &json!({"conversation": fresh_id, "input": "Hi!", "max_output_tokens": 4}),
        ),
        "response",
    );
    assert_eq!(items(two, fresh_id).len(), 2, "{served}");
}

#[test]
fn the_official_client_and_the_agents_sdk_use_conversations() {
    let nats = Nats::start();
    let model = model_dir(MODEL);
    let api = ApiServer::start(&nats, &model, SERVED_NAME, &["--worker-timeout-ms", "1500"]);
    let _worker = support::start_worker(&nats, &model, "w0", &[]);
    api.http.wait_for_workers(1, Duration::from_secs(30));
    support::run_python_script(
        "conversations.py",
        &format!("http://127.0.0.1:{}/v1", api.port),
        &[],
    );
}
