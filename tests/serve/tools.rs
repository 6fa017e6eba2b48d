//! Function calling: `tools` and `tool_choice` in, `message.tool_calls` out (streamed as
//! tool-call deltas), and a following request carrying the call and its `tool` result. The tiny
//! model's ChatML template has no tool format, so the functions reach it in the system message.

use serde_json::{json, Value};

use super::*;

fn tools() -> Value {
    json!([
        {"type": "function", "function": {"name": "get_weather", "description": "The weather now",
         "parameters": {"type": "object", "properties": {"city": {"enum": ["Oslo", "Lima"]}},
                        "required": ["city"], "additionalProperties": false}}},
        {"type": "function", "function": {"name": "move",
         "parameters": {"type": "object", "properties": {"dir": {"enum": ["up", "down"]}, "far": {"type": "boolean"}},
                        "required": ["dir", "far"], "additionalProperties": false}}}
    ])
}

fn with_tools(prompt: &str, choice: Value) -> Value {
    let mut r = ask(BASE, prompt, 64);
    r["tools"] = tools();
    r["tool_choice"] = choice;
    r
}

/// The one call of a response, checked against its function's schema: (name, arguments).
fn the_call(v: &Value) -> (String, Value) {
    let choice = &v["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls", "{v}");
    assert!(choice["message"]["content"].is_null(), "{v}");
    let calls = choice["message"]["tool_calls"].as_array().unwrap();
    assert_eq!(calls.len(), 1, "{v}");
    assert_eq!(calls[0]["type"], "function");
    assert!(calls[0]["id"].as_str().unwrap().starts_with("call_"));
    let name = calls[0]["function"]["name"].as_str().unwrap().to_string();
    // OpenAI's form: the arguments are a JSON string.
    let args: Value =
        serde_json::from_str(calls[0]["function"]["arguments"].as_str().unwrap()).unwrap();
    match name.as_str() {
        "get_weather" => assert!(["Oslo", "Lima"].contains(&args["city"].as_str().unwrap())),
        "move" => {
            assert!(["up", "down"].contains(&args["dir"].as_str().unwrap()));
            assert!(args["far"].is_boolean());
            assert_eq!(args.as_object().unwrap().len(), 2);
        }
        other => panic!("called {other}: {v}"),
    }
    (name, args)
}

#[test]
fn required_and_named_calls_come_back_as_tool_calls_streamed_or_not() {
    let server = Server::start(&[]);
    for prompt in ["hello", "which way?", "the weather in Oslo"] {
        the_call(&server.chat(&with_tools(prompt, json!("required"))).json());
        let named = json!({"type": "function", "function": {"name": "move"}});
        let (name, _) = the_call(&server.chat(&with_tools(prompt, named)).json());
        assert_eq!(name, "move");
    }
    // Streamed: the role, the call's id and name, its arguments, the finish reason, [DONE].
    let named = json!({"type": "function", "function": {"name": "get_weather"}});
    let whole = server.chat(&with_tools("hello", named.clone())).json();
    let mut streamed = with_tools("hello", named);
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let events = server.chat(&streamed).events();
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert_eq!(chunks.len(), 5, "{chunks:?}");
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let head = &chunks[1]["choices"][0]["delta"]["tool_calls"][0];
    let whole_call = &whole["choices"][0]["message"]["tool_calls"][0];
    assert_eq!(head["index"], 0);
    assert_eq!(head["function"]["name"], "get_weather");
    assert!(head["id"].as_str().unwrap().starts_with("call_"));
    let args = &chunks[2]["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"];
    assert_eq!(args, &whole_call["function"]["arguments"]);
    assert_eq!(chunks[3]["choices"][0]["finish_reason"], "tool_calls");
    assert_eq!(chunks[4]["usage"], whole["usage"]);
}

#[test]
fn the_next_turn_carries_the_call_and_its_result() {
    let server = Server::start(&[]);
    let first = server
        .chat(&with_tools("the weather in Oslo", json!("required")))
        .json();
    let (name, _) = the_call(&first);
    let call = first["choices"][0]["message"]["tool_calls"][0].clone();
    let mut next = with_tools("the weather in Oslo", json!("auto"));
    let messages = next["messages"].as_array_mut().unwrap();
    messages.push(json!({"role": "assistant", "content": null, "tool_calls": [call.clone()]}));
    messages.push(json!({"role": "tool", "tool_call_id": call["id"], "content": "21 C, sunny"}));
    next["max_tokens"] = json!(12);
    let r = server.chat(&next);
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    // The call and its result are part of the prompt.
    let grown = v["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(
        grown > first["usage"]["prompt_tokens"].as_u64().unwrap() + 10,
        "{v}"
    );
    let finish = v["choices"][0]["finish_reason"].as_str().unwrap();
    if finish == "tool_calls" {
        the_call(&v);
    } else {
        assert!(v["choices"][0]["message"]["content"].is_string(), "{v}");
    }
    assert!(!name.is_empty());
}

#[test]
fn tool_choice_none_is_plain_text_and_bad_tools_name_their_field() {
    let server = Server::start(&[]);
    let plain = server.chat(&ask(BASE, "hello", 12)).json();
    let mut none = with_tools("hello", json!("none"));
    none["max_tokens"] = json!(12);
    let none = server.chat(&none).json();
    assert_eq!(none["choices"], plain["choices"]);

    let mut bad_schema = with_tools("hello", json!("auto"));
    bad_schema["tools"][1]["function"]["parameters"] = json!({"type": "no-such-type"});
    server.chat(&bad_schema).assert_error(
        400,
        Some("tools[1].function.parameters"),
        Some("invalid_value"),
        "schema",
    );
    let mut bad_choice = with_tools(
        "hello",
        json!({"type": "function", "function": {"name": "fly"}}),
    );
    bad_choice["max_tokens"] = json!(4);
    server.chat(&bad_choice).assert_error(
        400,
        Some("tool_choice.function.name"),
        Some("invalid_value"),
        "unknown function",
    );
    let mut tool_calls_on_user = ask(BASE, "hello", 4);
    tool_calls_on_user["messages"][1]["tool_calls"] =
        json!([{"id": "c", "type": "function", "function": {"name": "move", "arguments": "{}"}}]);
    server.chat(&tool_calls_on_user).assert_error(
        400,
        Some("messages[1].tool_calls"),
        Some("invalid_value"),
        "tool_calls on a user message",
    );
    // The server keeps answering.
    assert_eq!(server.chat(&ask(BASE, "hello", 4)).status, 200);
}
